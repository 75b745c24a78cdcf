"""HEST-Benchmark linear probe on a task written in HEST's layout from real HER2ST sections."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import genedml_sd as gd
from genedml_sd.datasets._layouts.hest_bench import write_hest_task
from genedml_sd.tl._hest import hest_benchmark, load_hest_task

MAX_SPOTS = 50  # 100 training spots per split > 87 stain-texture features: a well-posed probe


@pytest.fixture(scope="module")
def encoder():
    from genedml_sd.encoders import load_encoder

    return load_encoder("stain-texture")


@pytest.fixture(scope="module")
def mean_colour():
    """A cheap custom encoder: the mean of each normalised channel, (B, 3)."""
    from torch import nn

    from genedml_sd.encoders import EncoderSpec, load_encoder, register_encoder

    class MeanColour(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    spec = EncoderSpec(name="hest-mean-colour-test", description="", builder="custom", embed_dim=3)
    register_encoder(spec, builder=lambda spec, pretrained: MeanColour(), overwrite=True)
    return load_encoder("hest-mean-colour-test", pretrained=False)


@pytest.fixture(scope="module")
def hest_task(her2st_root, tmp_path_factory):
    """B4 (patient B) and C2 (patient C) of the shipped demo and A1 (patient A) of the data root: 3 splits."""
    slides = [*gd.datasets.her2st_demo(["B4", "C2"]), gd.io.her2st(her2st_root, "A1")]
    root = tmp_path_factory.mktemp("hest_bench")
    return write_hest_task(root, slides, max_spots=MAX_SPOTS)


def _copy(truth, tmp_path):
    dst = tmp_path / "bench" / truth.task_dir.name
    shutil.copytree(truth.task_dir, dst)
    return dst


def test_layout_matches_hest(hest_task):
    task = hest_task.task_dir
    assert sorted(p.name for p in (task / "splits").iterdir()) == [
        f"{k}_{i}.csv" for k in ("test", "train") for i in range(3)
    ]
    # one split per patient (sorted A, B, C), HEST's create_splits columns and relative paths
    test0 = pd.read_csv(task / "splits" / "test_0.csv")
    assert list(test0.columns) == ["sample_id", "patches_path", "expr_path"]
    assert test0.to_dict("records") == [
        {"sample_id": "A1", "patches_path": "patches/A1.h5", "expr_path": "adata/A1.h5ad"}
    ]
    assert pd.read_csv(task / "splits" / "train_0.csv")["sample_id"].tolist() == ["B4", "C2"]
    genes = json.loads((task / "var_50genes.json").read_text())["genes"]
    assert genes == hest_task.genes and len(genes) == 50 and genes == sorted(genes)
    with h5py.File(task / "patches" / "B4.h5") as f:
        img, coords, barcode = f["img"], f["coords"][:], f["barcode"][:]
        assert img.shape == (MAX_SPOTS, 224, 224, 3) and img.dtype == np.uint8
        assert coords.shape == (MAX_SPOTS, 2) and coords.dtype.kind == "i" and barcode.shape == (MAX_SPOTS, 1)
        um = img.attrs["pixel_size"]
        size = img.attrs["patch_size_src"]
        assert size == round(224 * 0.5 / um) and img.attrs["patch_size_target"] == 224
        # the tile is the real H&E around the spot: same mean colour as the source crop
        b4 = gd.datasets.her2st_demo(["B4"])[0]
        he = b4["B4_he"]["scale0"]["image"].values.transpose(1, 2, 0)
        x, y = coords[0]
        crop = he[y : y + size, x : x + size].reshape(-1, 3).mean(0)
        np.testing.assert_allclose(img[0].reshape(-1, 3).mean(0), crop, atol=2.0)
        centre = coords + (224 * 0.5 / um) / 2
        np.testing.assert_allclose(centre, hest_task.centres_px["B4"], atol=1.0)
    import anndata as ad

    adata = ad.read_h5ad(task / "adata" / "B4.h5ad")
    assert adata.obs_names.tolist() == [b.decode() for b in barcode.ravel()]
    np.testing.assert_array_equal(adata[:, genes].X.toarray(), hest_task.counts["B4"])


@pytest.mark.parametrize("enc", ["mean_colour", pytest.param("encoder", marks=pytest.mark.slow)])
def test_probe_equals_direct_sklearn(hest_task, enc, request):
    from scipy.stats import pearsonr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    encoder = request.getfixturevalue(enc)
    df = hest_benchmark(hest_task.task_dir.parent, encoder, seed=1)
    # reference: features straight from the h5 tiles, targets log1p of the counts the layout was written from
    feats = {}
    for s in hest_task.samples:
        with h5py.File(hest_task.task_dir / "patches" / f"{s}.h5") as f:
            tiles = torch.from_numpy(f["img"][:]).permute(0, 3, 1, 2)
        with torch.inference_mode():
            feats[s] = encoder(tiles).numpy()
    per_gene = pd.DataFrame(df.attrs["per_gene"])
    means = []
    for i, (train, test) in enumerate(hest_task.splits):
        xtr = np.concatenate([feats[s] for s in train])
        xte = np.concatenate([feats[s] for s in test])
        ytr = np.log1p(np.concatenate([hest_task.counts[s] for s in train]).astype(np.float64))
        yte = np.log1p(np.concatenate([hest_task.counts[s] for s in test]).astype(np.float64))
        k = min(256, xtr.shape[0], xtr.shape[1])
        scaler, pca = StandardScaler(), PCA(n_components=k, random_state=1)
        ztr = pca.fit_transform(scaler.fit_transform(xtr)).astype(np.float32)
        zte = pca.transform(scaler.transform(xte)).astype(np.float32)
        assert k == min(encoder.embed_dim, 2 * MAX_SPOTS)
        alpha = 100 / (k * 50)
        ridge = Ridge(alpha=alpha, solver="lsqr", fit_intercept=False, max_iter=1000, random_state=1).fit(ztr, ytr)
        pred = ridge.predict(zte)
        r = np.array([np.corrcoef(pred[:, g], yte[:, g])[0, 1] for g in range(50)])
        assert np.isfinite(r).all()
        np.testing.assert_allclose(r, [pearsonr(pred[:, g], yte[:, g])[0] for g in range(50)], atol=1e-9)
        got = per_gene[per_gene["split"] == i].set_index("gene").loc[hest_task.genes, "pearson"].to_numpy()
        np.testing.assert_allclose(got, r, atol=1e-6)
        row = df[df["split"] == i].iloc[0]
        assert row["n_train"] == len(ytr) and row["n_test"] == len(yte) == MAX_SPOTS
        assert row["n_components"] == k and row["alpha"] == pytest.approx(alpha)
        np.testing.assert_allclose(row["pearson_mean"], r.mean(), atol=1e-6)
        means.append(r.mean())
    summary = df.set_index("split")["pearson_mean"]
    np.testing.assert_allclose(summary["mean"], np.mean(means), atol=1e-6)
    np.testing.assert_allclose(summary["sd"], np.std(means), atol=1e-6)
    assert df.attrs["genes"]["HER2ST"] == hest_task.genes and df.attrs["encoder"] == encoder.name
    assert "HER2ST" in repr(df)  # attrs hold plain records: the frame prints and concatenates


def test_loaded_task_aligns_patches_and_counts(hest_task, tmp_path, mean_colour):
    # shuffle the adata rows: expression must follow the patch file's barcodes, not the row order
    import anndata as ad

    task = _copy(hest_task, tmp_path)
    path = task / "adata" / "C2.h5ad"
    adata = ad.read_h5ad(path)
    adata[np.random.default_rng(0).permutation(adata.n_obs)].copy().write_h5ad(path)
    loaded = load_hest_task(task, mean_colour, batch_size=7)
    c2 = loaded.samples["C2"]
    np.testing.assert_allclose(c2.expression, np.log1p(hest_task.counts["C2"]))
    assert c2.barcodes == hest_task.barcodes["C2"] and c2.features.shape == (MAX_SPOTS, 3)
    # features of the tiles in file order, batch by batch: the normalised mean colour of each tile
    with h5py.File(task / "patches" / "C2.h5") as f:
        mean = f["img"][:].reshape(MAX_SPOTS, -1, 3).mean(1)
    scale, shift = mean_colour.scale.ravel().numpy(), mean_colour.shift.ravel().numpy()
    np.testing.assert_allclose(c2.features, mean * scale - shift, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c2.centres_um, hest_task.centres_px["C2"] * hest_task.pixel_size["C2"], atol=1.0)
    assert loaded.splits == [(tr, te) for tr, te in hest_task.splits]


def test_bad_inputs_name_the_file_or_key(hest_task, tmp_path):
    task = _copy(hest_task, tmp_path)
    bench = task.parent
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hest_benchmark(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"NOPE.*no splits folder"):
        hest_benchmark(bench, tasks=["NOPE"])
    shutil.rmtree(task / "splits")
    with pytest.raises(FileNotFoundError, match="no sub-folder has a splits/ folder"):
        hest_benchmark(bench)
    shutil.copytree(hest_task.task_dir / "splits", task / "splits")
    (task / "splits" / "test_2.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_<i>.csv and test_<i>.csv"):
        hest_benchmark(bench)
    shutil.copy(hest_task.task_dir / "splits" / "test_2.csv", task / "splits" / "test_2.csv")
    pd.read_csv(task / "splits" / "train_1.csv").rename(columns={"expr_path": "adata"}).to_csv(
        task / "splits" / "train_1.csv", index=False
    )
    with pytest.raises(ValueError, match=r"train_1.csv.*lacks column\(s\) \['expr_path'\]"):
        hest_benchmark(bench)
    shutil.copy(hest_task.task_dir / "splits" / "train_1.csv", task / "splits" / "train_1.csv")
    (task / "var_50genes.json").write_text(json.dumps({"gene_list": hest_task.genes}))
    with pytest.raises(KeyError, match=r"var_50genes.json.*has no \W+genes\W+ key"):
        hest_benchmark(bench)
    # a gene of the list missing from one sample's adata
    (task / "var_50genes.json").write_text(json.dumps({"genes": [*hest_task.genes[:49], "NOTAGENE"]}))
    with pytest.raises(KeyError, match=r"B4.h5ad.*lacks 1 gene\(s\).*NOTAGENE"):
        hest_benchmark(bench)
    (task / "var_50genes.json").write_text(json.dumps({"genes": hest_task.genes}))
    with h5py.File(task / "patches" / "B4.h5", "a") as f:
        del f["barcode"]
    with pytest.raises(KeyError, match=r"B4.h5.*has no \W+barcode\W+ dataset"):
        hest_benchmark(bench)
    (task / "patches" / "B4.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"patches/B4.h5.*sample 'B4'"):
        hest_benchmark(bench)
