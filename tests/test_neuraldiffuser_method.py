"""NeuralDiffuser end to end on a toy store with tiny random backbones: stages, resume, load, reconstruct."""

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch
from tiny_sd import tiny_sd_parts
from torch import nn

from fmrirecon.errors import SubjectMismatchError
from fmrirecon.methods import get_method
from fmrirecon.methods.base import RunData, init_run_dir, mark_done
from fmrirecon.methods.neuraldiffuser import (
    NeuralDiffuser,
    NeuralDiffuserMethodConfig,
    NeuralDiffuserTraining,
)
from fmrirecon.methods.neuraldiffuser.model import DecoderSizes
from fmrirecon.methods.neuraldiffuser.pipeline import ReconstructionSettings
from fmrirecon.methods.neuraldiffuser.retrieval import voting_retrieval
from fmrirecon.train import TrainConfig

VOXELS = {1: 30, 2: 26}


def write_toy_store(root, n_images=24, n_test=6, size=16, seed=0):
    """A prepared store (docs/contracts.md layout): betas = fixed random linear map of the image + noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    images = rng.integers(0, 256, size=(n_images, size, size, 3), dtype=np.uint8)
    ids = np.arange(n_images, dtype=np.int64) * 3
    captions = np.array([[f"scene {i} caption {k}" for k in range(5)] for i in range(n_images)], dtype=object)
    with h5py.File(root / "stimuli.hdf5", "w") as f:
        f["images"], f["ids_73k"] = images, ids
        f.create_dataset("captions", data=captions.astype(str).astype(object), dtype=h5py.string_dtype())
    flat = images.reshape(n_images, -1).astype(np.float32) / 255.0
    for subject, n_vox in VOXELS.items():
        w = rng.normal(size=(flat.shape[1], n_vox)).astype(np.float32) / 20
        order = np.concatenate([np.arange(n_images), np.arange(n_images - n_test, n_images)])  # test twice
        betas = flat[order] @ w + 0.05 * rng.normal(size=(len(order), n_vox)).astype(np.float32)
        with h5py.File(root / f"subj{subject:02d}.hdf5", "w") as f:
            f["betas"] = betas.astype(np.float32)
            g = f.create_group("trials")
            g["image_id_73k"] = ids[order]
            g["session"] = np.repeat([1, 2, 3, 4], int(np.ceil(len(order) / 4)))[: len(order)]
            g["repeat"] = (np.arange(len(order)) >= n_images).astype(int)
            g["shared"] = order >= n_images - n_test
            g["global_trial"] = np.arange(len(order))
            f["voxel_ijk"] = rng.integers(0, 9, size=(n_vox, 3))
            f["affine"] = np.eye(4)
            f.attrs["subject"], f.attrs["n_sessions"] = subject, 4
    manifest = {
        "format": "fmrirecon-store",
        "version": 1,
        "source": {},
        "subjects": [1, 2],
        "sessions": {"1": 4, "2": 4},
        "roi": "nsdgeneral",
        "world": None,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


# Like TinyFeatures in tests/test_neuraldiffuser_pipeline.py, with equal token counts per layer as in CLIP.
class TinyClip(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        # 16 tokens per layer
        self.convs = nn.ModuleList([nn.Conv2d(3, 6, 4, stride=4), nn.Conv2d(6, 6, 3, padding=1)])
        self.requires_grad_(False)

    def image_hidden_states(self, images, layers, site="block"):
        out, h = [], nn.functional.interpolate(images, size=(16, 16), mode="bilinear")
        for conv in self.convs:
            h = torch.tanh(conv(h))
            out.append(h.flatten(2).transpose(1, 2))
        return [out[i - 1] for i in layers]


def tiny_ld():
    from fmrirecon.backbones.diffusion import LatentDiffusion

    vae, unet, scheduler = tiny_sd_parts()

    class Tiny(LatentDiffusion):
        def encode_text(self, texts):
            # Deterministic per-text embedding (5 tokens × 12) from a hash: a stand-in text encoder.
            rows = []
            for t in texts:
                seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
                rows.append(torch.randn(5, 12, generator=torch.Generator().manual_seed(seed)))
            return torch.stack(rows)

        def empty_text_embedding(self):
            return self.encode_text([""])

    return Tiny(vae, unet, scheduler, nn.Identity(), None)


def tiny_config(**overrides):
    train = dict(epochs=2, lr=1e-3, progress=False, checkpoint_every=2)
    cfg = NeuralDiffuserMethodConfig(
        diffusion="tiny",
        clip="tiny",
        guidance_layers=(1, 2),
        model=DecoderSizes(
            hidden_dim=32,
            mixer_blocks=1,
            projector_dim=16,
            prior_depth=1,
            prior_heads=2,
            prior_dim_head=8,
            prior_sample_steps=4,
            resmlp_blocks=1,
            grid_channels=8,
            grid_size=4,
            upsampler_channels=(8, 8),
            latent_projector_channels=8,
        ),
        training=NeuralDiffuserTraining(
            batch_size=8, pretrain_train=TrainConfig(**train), finetune_train=TrainConfig(**train)
        ),
        reconstruction=ReconstructionSettings(
            num_steps=4, strength=0.5, cfg_scale=2.0, feature_guidance_scale=50.0, guidance_strength=0.5
        ),
        progress=False,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nd")
    store = write_toy_store(tmp / "store")
    method = NeuralDiffuser(tiny_config())
    method._backbones = (tiny_ld(), TinyClip())
    # leave-the-target-out pretraining is a run of its own (subject 2); the target run starts from it
    pre_dir, run_dir = tmp / "pretrain", tmp / "run"
    pre = RunData([store], [2], "pretrain")
    init_run_dir(pre_dir, method="neuraldiffuser", config=method.config, data=pre, seed=0)
    pretrainer = NeuralDiffuser(method.config)
    pretrainer._backbones = method._backbones
    pretrainer.fit(pre, pre_dir, seed=0)
    mark_done(pre_dir)
    target = RunData.target(store, 1, init_from=pre_dir)
    init_run_dir(run_dir, method="neuraldiffuser", config=method.config, data=target, seed=0)
    method.fit(target, run_dir, seed=0)
    return method, store, run_dir


def test_registry_and_variants():
    assert get_method("neuraldiffuser") is NeuralDiffuser
    assert NeuralDiffuser().variants() == ["guided", "unguided"]
    paper = NeuralDiffuserMethodConfig()
    rec = paper.reconstruction
    assert (rec.feature_guidance_scale, rec.guidance_strength, rec.cfg_scale, rec.strength) == (
        3e5,
        0.2,
        7.5,
        0.75,
    )
    assert paper.training.pretrain_train.epochs == 150 and paper.model.prior_weight == 30.0


def test_fit_runs_named_stages_and_saves_model(fitted):
    _, _, run_dir = fitted
    decoders = ["semantic", "guidance.layer1", "guidance.layer2", "latent"]
    for name in decoders:
        for stage, stage_run in (("pretrain", run_dir.parent / "pretrain"), ("finetune", run_dir)):
            assert (stage_run / f"{stage}-{name}" / "done.json").is_file(), (stage, name)
            lines = (stage_run / f"{stage}-{name}" / "metrics.jsonl").read_text().splitlines()
            assert len(lines) >= 2 and all(
                np.isfinite(v) for v in json.loads(lines[-1]).values() if isinstance(v, float)
            )
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "targets.safetensors").is_file()
    # The fitted model only carries the target subject's voxel encoder (subject-specific model, §6).
    assert list(fitted[0].model.semantic.voxel_encoders.voxel_counts) == [1]


def test_fit_again_resumes_finished_stages_to_identical_weights(fitted, tmp_path):
    method, store, run_dir = fitted
    again = NeuralDiffuser(tiny_config())
    again._backbones = method._backbones
    again.fit(RunData.target(store, 1, init_from=run_dir.parent / "pretrain"), run_dir, seed=0)
    for a, b in zip(method.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


def test_reconstruct_load_and_determinism(fitted):
    method, store, run_dir = fitted
    from fmrirecon.data.store import PreparedStore

    ids, betas = PreparedStore(store).subject(1).averaged("test")
    guided = method.reconstruct(betas[:2], samples=2, seed=3, variant="guided")
    assert guided.shape == (2, 2, 16, 16, 3) and guided.dtype == np.uint8
    loaded = NeuralDiffuser.load(run_dir)
    loaded._backbones = method._backbones
    assert np.array_equal(loaded.reconstruct(betas[:2], samples=2, seed=3, variant="guided"), guided)
    unguided = loaded.reconstruct(betas[:2], samples=2, seed=3, variant="unguided")
    zero = loaded.reconstruct(
        betas[:2],
        samples=2,
        seed=3,
        variant="guided",
        settings=loaded.settings_from(["feature_guidance_scale=0"]),
    )
    assert np.array_equal(unguided, zero) and not np.array_equal(unguided, guided)
    with pytest.raises(SubjectMismatchError, match="26"):
        loaded.reconstruct(np.zeros((1, 26), np.float32))
    # second-order selection: one of each item's K samples, the one with the lowest guidance loss
    losses = loaded.selection_losses(betas[:2], guided, seed=3)
    best = loaded.select_best(betas[:2], guided, seed=3)
    assert losses.shape == (2, 2) and np.isfinite(losses).all()
    assert best.shape == (2, 1, 16, 16, 3)
    assert all(np.array_equal(best[i, 0], guided[i, losses[i].argmin()]) for i in range(2))
    with pytest.raises(ValueError, match="N, K"):
        loaded.selection_losses(betas[:2], guided[0])


def test_retrieval_embeddings(fitted):
    """§5.3: per layer, the projector output of f_g^l against the image's CLIP layer features g^l (the
    guidance decoders' training targets), each layer's top-1 merged by voting; the suite's joint space
    averages the per-layer cosines. Every value is checked against a computation written out here."""
    from safetensors.torch import load_file

    from fmrirecon.data.store import PreparedStore

    method, store, run_dir = fitted
    s = PreparedStore(store)
    ids, betas = s.subject(1).averaged("test")
    brain = method.brain_layer_embeddings(betas)
    image = method.image_layer_embeddings(s.images(ids))
    n, layers = len(ids), method.config.guidance_layers
    assert len(brain) == len(image) == len(layers) and brain[0].shape == image[0].shape == (n, 16 * 6)
    # brain side: voxel encoder -> backbone -> projector, flattened (not the backbone tokens the prior reads)
    x = torch.from_numpy(betas)
    for layer, got in zip(layers, brain):
        decoder = method.model.guidance[f"layer{layer}"]
        with torch.no_grad():
            projected = decoder.projector(decoder.backbone(decoder.voxel_encoders(x, 1)))
        np.testing.assert_allclose(got, projected.reshape(n, -1).numpy(), rtol=1e-5, atol=1e-6)
    # image side: the features the guidance decoders were trained to match, for the training images
    targets = load_file(run_dir / "targets.safetensors")
    train_side = method.image_layer_embeddings(s.images(targets["ids"][:5].numpy()))
    for layer, got in zip(layers, train_side):
        np.testing.assert_allclose(got, targets[f"layer{layer}"][:5].flatten(1).numpy(), rtol=1e-5, atol=1e-6)

    # voting by hand: every test item is a query once (pool = all 6 < 300); each layer votes for its most
    # cosine-similar candidate, most votes win, ties go to the larger cosine summed over layers
    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    def accuracy(queries, candidates):
        hits = 0
        for i in range(n):
            sims = [[cos(q[i], c[j]) for j in range(n)] for q, c in zip(queries, candidates)]
            votes = [sum(int(np.argmax(row)) == j for row in sims) for j in range(n)]
            winner = max(range(n), key=lambda j: (votes[j], sum(row[j] for row in sims)))
            hits += winner == i
        return hits / n

    out = voting_retrieval(brain, image)
    assert out["pool_size"] == n and out["chance"] == 1 / n
    assert out["retrieval_image"] == pytest.approx(accuracy(brain, image))
    assert out["retrieval_brain"] == pytest.approx(accuracy(image, brain))
    # the suite's joint embeddings: their dot product is the mean per-layer cosine
    joint = method.brain_embeddings(betas) @ method.image_embeddings(s.images(ids)).T  # (N, N)
    mean_cos = [
        [np.mean([cos(b[i], im[j]) for b, im in zip(brain, image)]) for j in range(n)] for i in range(n)
    ]
    np.testing.assert_allclose(joint, mean_cos, rtol=1e-4, atol=1e-5)


def test_targets_average_the_five_captions(fitted):
    from safetensors.torch import load_file

    from fmrirecon.data.store import PreparedStore

    method, store, run_dir = fitted
    targets = load_file(run_dir / "targets.safetensors")
    ld = method._backbones[0]
    i = 3
    image_id = int(targets["ids"][i])
    captions = PreparedStore(store).captions(np.array([image_id]))[0]
    torch.testing.assert_close(targets["text"][i], ld.encode_text(captions).mean(0))
    assert targets["latent"].shape[1:] == (4, 8, 8) and targets["layer2"].shape[1:] == (16, 6)


def test_cached_targets_follow_the_backbones(fitted):
    """A run's cached targets are reused only for the same backbones and settings (a retrained VAE, e.g. the
    world VAE whose posterior was pinned to its mean, must not leave stale latents behind)."""
    from safetensors.torch import load_file

    from fmrirecon.data.store import PreparedStore
    from fmrirecon.methods.neuraldiffuser.train import cached_targets

    method, store, run_dir = fitted
    ld, clip = method._backbones
    path = run_dir / "targets.safetensors"
    ids = load_file(path)["ids"].numpy()
    kwargs = dict(ld=ld, clip=clip, layers=(1, 2), site="block", sample_latents=True, seed=0, progress=False)
    before = path.stat().st_mtime_ns
    reused = cached_targets(path, PreparedStore(store), ids, **kwargs)
    assert path.stat().st_mtime_ns == before  # same backbones and settings: read back, not recomputed
    with torch.no_grad():
        ld.vae.quant_conv.bias[0] += 1.0  # the latents' first channel moves
    try:
        fresh = cached_targets(path, PreparedStore(store), ids, **kwargs)
    finally:
        with torch.no_grad():
            ld.vae.quant_conv.bias[0] -= 1.0
    assert not torch.allclose(fresh["latent"], reused["latent"])
    torch.testing.assert_close(fresh["text"], reused["text"])
    # back to the original backbones: recomputed again, to the very same targets
    restored = cached_targets(path, PreparedStore(store), ids, **kwargs)
    for key, value in reused.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=0)


def test_prior_sampling_steps_are_an_inference_setting(fitted):
    method, store, _ = fitted
    from fmrirecon.data.store import PreparedStore

    _, betas = PreparedStore(store).subject(1).averaged("test")
    steps = method.config.model.prior_sample_steps
    try:
        decoded = {}
        for n in (steps, 1):
            method.config.model.prior_sample_steps = n
            decoded[n] = method.decode(betas[:2], seed=0)
    finally:
        method.config.model.prior_sample_steps = steps
    again = method.decode(betas[:2], seed=0)
    torch.testing.assert_close(again["text"], decoded[steps]["text"])
    assert not torch.allclose(decoded[1]["text"], decoded[steps]["text"])
    # the latent path has no prior
    torch.testing.assert_close(decoded[1]["latent"], decoded[steps]["latent"])
