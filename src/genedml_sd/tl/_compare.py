"""``gd.tl.compare_methods``: paired comparison of two cross-validation results, with a CI and a p-value."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

# resampled variances below this fraction of the slide's variance are checked for exact constancy
_CONSTANT_CHECK = 1e-8
# replicates x spots per matrix product of the spot bootstrap (bounds its memory)
_CHUNK = 2**22


@dataclass
class _Slide:
    """One test slide of a fold, aligned between the two results (genes in one order)."""

    fold: int
    section: str
    genes: list[str]
    gene_pcc_a: np.ndarray  # (n_genes,) per-gene test PCC of a, NaN where undefined
    gene_pcc_b: np.ndarray
    constant: np.ndarray  # (n_genes,) observed expression constant on the slide
    pred_a: np.ndarray | None = None  # (n_spots, n_genes)
    pred_b: np.ndarray | None = None
    obs: np.ndarray | None = None


def compare_methods(
    a: pd.DataFrame | Mapping[str, pd.DataFrame],
    b: pd.DataFrame | None = None,
    *,
    labels: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    resample: Literal["auto", "spots", "genes"] = "auto",
) -> pd.DataFrame:
    """Paired comparison of cross-validation results: difference of PCC(A), bootstrap CI, Wilcoxon test.

    Both results must come from :func:`~genedml_sd.tl.cross_validate` on the same slides and folds,
    so every test slide and gene is scored by both methods and the comparison is paired.

    The statistic is ``delta_pcc_a`` = PCC(A) of ``a`` minus PCC(A) of ``b``, where PCC(A) is built
    as in the ``mean`` row of ``cross_validate``: per test slide the mean PCC over the genes defined
    there (observed and predicted expression not constant), averaged over the slides of a fold,
    then over folds. Its confidence interval is a percentile bootstrap:

    - ``"spots"`` (when both results were made with ``keep_predictions=True``): each replicate
      draws, for every test slide, its spots with replacement (the same rows for both methods),
      recomputes both methods' per-gene PCCs on them (genes whose resampled observed values are
      constant drop out for both) and averages them as above. Spots are the sampling unit of what
      is measured, so this reflects the noise of the test data, and it keeps the correlation
      between genes (which co-vary across spots) intact.
    - ``"genes"`` (without predictions): each replicate draws, within each fold, the fold's genes
      with replacement (the same genes for both methods) and averages the stored per-gene PCCs.
      It treats genes as independent, which they are not (co-expressed programmes), so its
      interval is usually too narrow: prefer spots when predictions were kept.

    Random draws come from ``numpy.random.default_rng(seed)``: for the spot bootstrap one
    ``integers(0, n_spots, size=(n_boot, n_spots))`` call per test slide, for the gene bootstrap one
    ``integers(0, n_genes, size=(n_boot, n_genes))`` call per fold, in fold then section order.

    Parameters
    ----------
    a
        A :func:`~genedml_sd.tl.cross_validate` result, or a dict ``{label: result}`` of two or
        more (then ``b`` and ``labels`` must be left out and every pair is compared, in dict order).
    b
        The other result, compared with ``a``.
    labels
        Names of ``a`` and ``b``; default each result's ``attrs["method"]`` (with its ``config``
        when both methods are the same, then ``" (a)"`` / ``" (b)"`` if still equal).
    n_boot
        Bootstrap replicates.
    seed
        Seed of the bootstrap draws (every pair uses it).
    confidence
        Coverage of the interval, in (0, 1).
    resample
        ``"auto"`` (spots when both results have ``attrs["predictions"]``, else genes), ``"spots"``
        or ``"genes"``.

    Returns
    -------
    One row per pair: ``method_a``, ``method_b``, ``pcc_a_a`` and ``pcc_a_b`` (each method's
    PCC(A)), ``delta_pcc_a``, ``ci_low``, ``ci_high`` (percentile interval of the bootstrap
    deltas), ``confidence``, ``ci_method`` (``"spots"`` or ``"genes"``), ``n_boot``,
    ``excludes_zero`` (the interval lies above or below 0), ``wilcoxon_p`` (two-sided
    ``scipy.stats.wilcoxon`` signed-rank test of the per-gene PCC differences pooled over
    every fold, test slide and gene defined for both; 1.0 when all differences are 0; these
    pairs are not independent, so read it as a descriptive p-value), ``n_pairs`` (number of such
    differences), ``frac_genes_a_better`` (fraction of them > 0), ``fold_deltas`` (list, per fold
    in fold order), ``folds_a_better`` (folds with a delta > 0) and ``n_folds``.

    Raises
    ------
    ValueError
        A result has no ``attrs["per_gene"]`` (made by an older version: rerun cross_validate), the
        two differ in their folds, a fold's test sections or a test section's genes or spots, or
        ``resample="spots"`` without predictions; or ``n_boot``, ``confidence``, ``labels`` are
        invalid.
    TypeError
        ``a`` or ``b`` is not a DataFrame (or a dict of them).
    """
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
    if resample not in ("auto", "spots", "genes"):
        raise ValueError(f"resample must be 'auto', 'spots' or 'genes', got {resample!r}.")
    pairs = _pairs(a, b, labels)
    rows = [
        _compare_pair(ra, rb, la, lb, n_boot=int(n_boot), seed=seed, confidence=confidence, resample=resample)
        for (la, ra), (lb, rb) in pairs
    ]
    return pd.DataFrame(rows)


def _pairs(
    a: pd.DataFrame | Mapping[str, pd.DataFrame], b: pd.DataFrame | None, labels: Sequence[str] | None
) -> list[tuple[tuple[str, pd.DataFrame], tuple[str, pd.DataFrame]]]:
    """The labelled pairs of results to compare."""
    if isinstance(a, Mapping):
        if b is not None or labels is not None:
            raise ValueError("With a dict of results, leave out b and labels (the dict keys are the labels).")
        if len(a) < 2:
            raise ValueError(f"A dict of results needs at least two methods, got {list(a)}.")
        items = [(str(k), v) for k, v in a.items()]
        for k, v in items:
            _check_frame(v, k)
        return list(itertools.combinations(items, 2))
    if b is None:
        raise TypeError("compare_methods needs two cross_validate results (a and b) or a dict of them.")
    _check_frame(a, "a")
    _check_frame(b, "b")
    if labels is None:
        labels = _default_labels(a, b)
    labels = [str(x) for x in labels]
    if len(labels) != 2:
        raise ValueError(f"labels must be two names, got {labels}.")
    return [((labels[0], a), (labels[1], b))]


def _check_frame(df: Any, name: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"Result {name!r} must be a gd.tl.cross_validate DataFrame, got {type(df).__name__}.")
    per_gene = df.attrs.get("per_gene")
    if not isinstance(per_gene, pd.DataFrame):
        raise ValueError(
            f"Result {name!r} has no attrs['per_gene'] (per-gene test PCCs): rerun cross_validate with this "
            "version of genedml-sd."
        )
    missing = {"fold", "section", "gene", "pcc", "constant"} - set(per_gene.columns)
    if missing:
        raise ValueError(f"attrs['per_gene'] of result {name!r} lacks columns {sorted(missing)}.")


def _default_labels(a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    names = [str(x.attrs.get("method", "model")) for x in (a, b)]
    if names[0] == names[1]:
        configs = [x.attrs.get("config") for x in (a, b)]
        if configs[0] != configs[1]:
            names = [f"{n} ({c})" for n, c in zip(names, configs, strict=True)]
    if names[0] == names[1]:
        names = [f"{names[0]} (a)", f"{names[1]} (b)"]
    return names


def _compare_pair(
    a: pd.DataFrame,
    b: pd.DataFrame,
    label_a: str,
    label_b: str,
    *,
    n_boot: int,
    seed: int,
    confidence: float,
    resample: str,
) -> dict[str, Any]:
    has_pred = "predictions" in a.attrs and "predictions" in b.attrs
    if resample == "spots" and not has_pred:
        which = [lab for lab, x in ((label_a, a), (label_b, b)) if "predictions" not in x.attrs]
        raise ValueError(
            f"resample='spots' needs attrs['predictions'] of both results; {which} have none "
            "(rerun cross_validate with keep_predictions=True)."
        )
    method = "spots" if resample == "spots" or (resample == "auto" and has_pred) else "genes"
    slides = _aligned_slides(a, b, label_a, label_b, with_predictions=method == "spots")
    folds = sorted({s.fold for s in slides})
    by_fold = [[s for s in slides if s.fold == f] for f in folds]

    def fold_means(pcc: str) -> np.ndarray:
        return np.array([_nanmean([_slide_mean(getattr(s, pcc), s.constant) for s in fs]) for fs in by_fold])

    fa, fb = fold_means("gene_pcc_a"), fold_means("gene_pcc_b")
    pcc_a_a, pcc_a_b = _nanmean(fa), _nanmean(fb)
    fold_deltas = fa - fb

    both = [~s.constant & np.isfinite(s.gene_pcc_a) & np.isfinite(s.gene_pcc_b) for s in slides]
    diffs = np.concatenate([s.gene_pcc_a[m] - s.gene_pcc_b[m] for s, m in zip(slides, both, strict=True)])
    rng = np.random.default_rng(seed)
    boot = _spot_bootstrap(by_fold, n_boot, rng) if method == "spots" else _gene_bootstrap(by_fold, n_boot, rng)
    boot = boot[np.isfinite(boot)]
    tail = 100 * (1 - confidence) / 2
    low, high = (float(v) for v in np.percentile(boot, [tail, 100 - tail])) if len(boot) else (np.nan, np.nan)
    return {
        "method_a": label_a,
        "method_b": label_b,
        "pcc_a_a": pcc_a_a,
        "pcc_a_b": pcc_a_b,
        "delta_pcc_a": pcc_a_a - pcc_a_b,
        "ci_low": low,
        "ci_high": high,
        "confidence": float(confidence),
        "ci_method": method,
        "n_boot": n_boot,
        "excludes_zero": bool(low > 0 or high < 0),
        "wilcoxon_p": _wilcoxon(diffs),
        "n_pairs": len(diffs),
        "frac_genes_a_better": float(np.mean(diffs > 0)) if len(diffs) else np.nan,
        "fold_deltas": [float(d) for d in fold_deltas],
        "folds_a_better": int(np.sum(fold_deltas > 0)),
        "n_folds": len(folds),
    }


def _wilcoxon(diffs: np.ndarray) -> float:
    from scipy.stats import wilcoxon

    if len(diffs) == 0:
        return float("nan")
    if not np.any(diffs != 0):
        return 1.0
    return float(wilcoxon(diffs, alternative="two-sided").pvalue)


def _nanmean(x: Sequence[float] | np.ndarray) -> float:
    """Mean over finite values (NaN when there are none), without numpy's empty-slice warning."""
    v = np.asarray(x, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def _slide_mean(pcc: np.ndarray, constant: np.ndarray) -> float:
    """PCC(A) of one slide: mean PCC over genes not constant there and defined (as score_predictions)."""
    ok = ~constant & np.isfinite(pcc)
    return float(pcc[ok].mean()) if ok.any() else float("nan")


def _aligned_slides(
    a: pd.DataFrame, b: pd.DataFrame, label_a: str, label_b: str, *, with_predictions: bool
) -> list[_Slide]:
    """Per test slide, both results' per-gene PCCs (and predictions) in one gene order; errors on mismatch."""
    ga, gb = a.attrs["per_gene"], b.attrs["per_gene"]
    folds_a, folds_b = sorted(set(ga["fold"].astype(int))), sorted(set(gb["fold"].astype(int)))
    if folds_a != folds_b:
        raise ValueError(
            f"{label_a!r} has folds {folds_a} but {label_b!r} has folds {folds_b}: compare results of the same folds."
        )
    slides = []
    for fold in folds_a:
        sa, sb = ga[ga["fold"] == fold], gb[gb["fold"] == fold]
        secs_a, secs_b = sorted(set(sa["section"].astype(str))), sorted(set(sb["section"].astype(str)))
        if secs_a != secs_b:
            raise ValueError(
                f"Fold {fold} tests sections {secs_a} in {label_a!r} but {secs_b} in {label_b!r}: "
                "compare cross_validate results of the same slides and groups."
            )
        for section in secs_a:
            rows_a = sa[sa["section"].astype(str) == section].set_index("gene")
            rows_b = sb[sb["section"].astype(str) == section].set_index("gene")
            genes = [str(g) for g in rows_a.index]
            if set(genes) != set(map(str, rows_b.index)) or len(genes) != len(rows_b):
                only_a = sorted(set(genes) - set(map(str, rows_b.index)))
                only_b = sorted(set(map(str, rows_b.index)) - set(genes))
                raise ValueError(
                    f"Fold {fold}, section {section!r}: the genes differ (only in {label_a!r}: {only_a[:10]}, only "
                    f"in {label_b!r}: {only_b[:10]}); compare results made with the same genes."
                )
            rows_b = rows_b.loc[genes]
            constant = rows_a["constant"].to_numpy(bool)
            if not np.array_equal(constant, rows_b["constant"].to_numpy(bool)):
                bad = [g for g, x, y in zip(genes, constant, rows_b["constant"], strict=True) if x != y]
                raise ValueError(
                    f"Fold {fold}, section {section!r}: genes {bad[:10]} are constant in one result only, so the "
                    "observed expression differs (another layer or normalisation?)."
                )
            slide = _Slide(
                fold, section, genes, rows_a["pcc"].to_numpy(np.float64), rows_b["pcc"].to_numpy(np.float64), constant
            )
            if with_predictions:
                _attach_predictions(slide, a, b, label_a, label_b)
            slides.append(slide)
    return slides


def _attach_predictions(slide: _Slide, a: pd.DataFrame, b: pd.DataFrame, label_a: str, label_b: str) -> None:
    arrays = []
    for label, res in ((label_a, a), (label_b, b)):
        entry = res.attrs["predictions"].get(slide.section)
        if entry is None:
            raise ValueError(f"attrs['predictions'] of {label!r} has no test section {slide.section!r}.")
        if int(entry["fold"]) != slide.fold:
            raise ValueError(
                f"Section {slide.section!r} is in fold {entry['fold']} of {label!r}'s predictions, "
                f"fold {slide.fold} of its per-gene table."
            )
        col = {str(g): j for j, g in enumerate(entry["genes"])}
        missing = [g for g in slide.genes if g not in col]
        if missing:
            raise ValueError(f"Section {slide.section!r}: genes {missing[:10]} missing from {label!r}'s predictions.")
        order = [col[g] for g in slide.genes]
        arrays.append(
            (
                np.asarray(entry["predicted"], np.float64)[:, order],
                np.asarray(entry["observed"], np.float64)[:, order],
            )
        )
    (pred_a, obs_a), (pred_b, obs_b) = arrays
    if obs_a.shape != obs_b.shape or not np.allclose(obs_a, obs_b, rtol=1e-5, atol=1e-6):
        raise ValueError(
            f"Section {slide.section!r}: the observed expression of {label_a!r} {obs_a.shape} and {label_b!r} "
            f"{obs_b.shape} differs (other spots, layer or normalisation?)."
        )
    slide.pred_a, slide.pred_b, slide.obs = pred_a, pred_b, obs_a


def _aggregate(slide_means: list[np.ndarray], by_fold: list[list[_Slide]]) -> np.ndarray:
    """Per-replicate PCC(A) from (n_boot,) slide means in fold order: nanmean per fold, then over folds."""
    out, k = [], 0
    for fs in by_fold:
        out.append(_nanmean_rows(np.stack(slide_means[k : k + len(fs)], axis=1)))
        k += len(fs)
    return _nanmean_rows(np.stack(out, axis=1))


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    n = ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, x, 0.0).sum(axis=1) / n, np.nan)


def _gene_bootstrap(by_fold: list[list[_Slide]], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) bootstrap deltas, resampling each fold's genes (the same draws for both methods)."""
    means: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    for fs in by_fold:
        n_genes = len(fs[0].genes)
        draws = rng.integers(0, n_genes, size=(n_boot, n_genes))
        weights = _counts(draws, n_genes)  # (n_boot, n_genes) multiplicity of each gene
        for s in fs:
            if s.genes != fs[0].genes:  # all test slides of a fold share the fold's model genes
                raise ValueError(f"Fold {s.fold}: test sections {fs[0].section!r} and {s.section!r} have other genes.")
            for key, pcc in (("a", s.gene_pcc_a), ("b", s.gene_pcc_b)):
                ok = ~s.constant & np.isfinite(pcc)
                n = weights @ ok.astype(np.float64)
                with np.errstate(invalid="ignore", divide="ignore"):
                    means[key].append(np.where(n > 0, weights @ np.where(ok, pcc, 0.0) / n, np.nan))
    return _aggregate(means["a"], by_fold) - _aggregate(means["b"], by_fold)


def _spot_bootstrap(by_fold: list[list[_Slide]], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) bootstrap deltas, resampling each test slide's spots (the same rows for both methods)."""
    means: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    for fs in by_fold:
        for s in fs:
            assert s.obs is not None and s.pred_a is not None and s.pred_b is not None
            r_a, r_b = _resampled_pearson(s.obs, [s.pred_a, s.pred_b], s.constant, n_boot, rng)
            means["a"].append(_nanmean_rows(r_a))
            means["b"].append(_nanmean_rows(r_b))
    return _aggregate(means["a"], by_fold) - _aggregate(means["b"], by_fold)


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    """(n_rep, n) float64 multiplicity of each index in each row of ``draws`` (n_rep, m)."""
    n_rep = draws.shape[0]
    flat = (draws + n * np.arange(n_rep)[:, None]).ravel()
    return np.bincount(flat, minlength=n_rep * n).reshape(n_rep, n).astype(np.float64)


def _resampled_pearson(
    obs: np.ndarray, preds: list[np.ndarray], constant: np.ndarray, n_boot: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per-gene Pearson r of each prediction with ``obs`` over ``n_boot`` spot resamples, (n_boot, n_genes) each.

    The draws are ``rng.integers(0, n_spots, size=(n_boot, n_spots))``, taken a block of replicates
    at a time (the same stream). A replicate with multiplicities ``c`` (n_spots,) gives the weighted
    moments ``c @ x / n_spots``, so all replicates and genes come from matrix products on data
    centred by its slide mean. A gene is NaN where it is constant on the slide or its resampled
    observed (for every prediction) or predicted values are constant; small resampled variances
    are checked exactly on the drawn rows.
    """
    n_spots = obs.shape[0]
    y = obs - obs.mean(axis=0)
    y_sq, y_var = y * y, (y * y).mean(axis=0)
    xs = [p - p.mean(axis=0) for p in preds]
    x_sq = [x * x for x in xs]
    xy = [x * y for x in xs]
    x_var = [q.mean(axis=0) for q in x_sq]
    out = [np.empty((n_boot, obs.shape[1])) for _ in preds]
    step = max(1, _CHUNK // max(n_spots, 1))
    for lo in range(0, n_boot, step):
        idx = rng.integers(0, n_spots, size=(min(step, n_boot - lo), n_spots))
        c = _counts(idx, n_spots) / n_spots
        my = c @ y
        vy = c @ y_sq - my * my
        y_const = _constant_columns(obs, idx, vy, y_var) | constant
        for k, o in enumerate(out):
            mx = c @ xs[k]
            vx = c @ x_sq[k] - mx * mx
            cov = c @ xy[k] - mx * my
            bad = y_const | _constant_columns(preds[k], idx, vx, x_var[k])
            with np.errstate(invalid="ignore", divide="ignore"):
                o[lo : lo + len(idx)] = np.where(bad, np.nan, cov / np.sqrt(vx * vy))
    return out


def _constant_columns(values: np.ndarray, idx: np.ndarray, var: np.ndarray, slide_var: np.ndarray) -> np.ndarray:
    """(n_rep, n_genes) whether the drawn rows ``idx`` (n_rep, n_spots) of each column of ``values`` are all equal.

    ``var`` are the moment variances of the draws and ``slide_var`` the columns' variances on the
    slide. Rounding leaves equal values with a moment variance ~1e-16 x slide variance rather than
    0, so only cells below ``_CONSTANT_CHECK`` x slide variance (rare) are checked on the values.
    """
    out = np.zeros(var.shape, dtype=bool)
    out[:, slide_var == 0] = True
    rep, gene = np.nonzero((var <= _CONSTANT_CHECK * slide_var) & (slide_var > 0))
    for r, g in zip(rep, gene, strict=True):
        drawn = values[idx[r], g]
        out[r, g] = bool(drawn.min() == drawn.max())
    return out
