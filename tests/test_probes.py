"""Probes: planted directions recovered by RFM and ridge, parity with calling xrfm
directly, the two RFM recipes (the project's and MusicRFM's code), `train_pack` on a
small synthetic feature store, and bad input."""

import csv
import json

import numpy as np
import pytest
import torch

from musicsteer.errors import MusicsteerError
from musicsteer.probes.common import ProbeError, auc
from musicsteer.probes.linear import fit_diffmean, fit_logistic, fit_ridge
from musicsteer.steering.pack import ConceptPack
from musicsteer.probes.rfm import RECIPES, RfmParams, RfmSearch, fit_rfm, recipe
from musicsteer.probes.train import evaluation_table, train_pack

SIGNAL_LAYER = 1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: a second torch thread only adds overhead on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _orth(rng, D, basis):
    v = rng.normal(size=D)
    for b in basis:
        v -= (v @ b) * b
    return v / np.linalg.norm(v)


def planted(seed, task, N=400, D=48, layers=3):
    """Features (layers, N, D) where only SIGNAL_LAYER carries the target along a unit u.

    Every layer: unit Gaussian noise, a std-5 distractor direction w, a nuisance c whose
    coordinate is correlated (0.8) with the distractor's, and a constant offset; u, w and c
    are orthogonal. At the signal layer the coordinate along u is the target (+-1.5 for
    the two classes, or a linear function of the value) with noise of std 0.4."""
    rng = np.random.default_rng(seed)
    u = _orth(rng, D, [])
    w = _orth(rng, D, [u])
    c = _orth(rng, D, [u, w])
    if task == "classification":
        y = (np.arange(N) % 2).astype(float)
        rng.shuffle(y)
        coord = 1.5 * (2 * y - 1)
    else:
        t = rng.uniform(-1, 1, N)
        y = 120 + 60 * t  # a tempo in BPM
        coord = 3.0 * t
    X = np.empty((layers, N, D))
    for layer in range(layers):
        noise = rng.normal(size=(N, D))
        dis = 5.0 * rng.normal(size=N)
        nuis = 3.0 * (0.8 * dis / 5.0 + 0.6 * rng.normal(size=N))
        x = noise + np.outer(dis, w) + np.outer(nuis, c) + 3.0
        if layer == SIGNAL_LAYER:
            x += np.outer(coord - x @ u + 3.0 * u.sum() + 0.4 * rng.normal(size=N), u)
        X[layer] = x
    return X.astype(np.float32), y, u


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("method", ["rfm", "linear"])
def test_planted_direction_is_recovered(task, method):
    X, y, u = planted(3, task)
    scores, dirs = [], []
    for layer in range(X.shape[0]):
        args = (X[layer, :300], y[:300], X[layer, 300:], y[300:])
        probe = (fit_rfm(*args, params=RfmSearch(budget=6, seed=0), device="cpu") if method == "rfm"
                 else fit_ridge(*args))
        assert probe.task == task
        scores.append(probe.val_score)
        dirs.append(probe.direction())
    v = dirs[SIGNAL_LAYER]
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
    assert v @ u >= 0.95, f"cosine {v @ u:.3f} (scores {scores})"  # right direction and sign
    assert int(np.argmax(scores)) == SIGNAL_LAYER
    assert scores[SIGNAL_LAYER] > (0.99 if task == "classification" else 0.9)
    assert max(s for i, s in enumerate(scores) if i != SIGNAL_LAYER) < (0.75 if task == "classification" else 0.3)


def test_other_linear_probes_point_the_right_way():
    X, y, u = planted(4, "classification")
    args = (X[SIGNAL_LAYER, :300], y[:300], X[SIGNAL_LAYER, 300:], y[300:])
    for probe in (fit_logistic(*args), fit_diffmean(*args)):
        assert probe.direction() @ u > 0.85 and probe.val_score > 0.95
        assert auc(y[300:], probe.predict(X[SIGNAL_LAYER, 300:])) == pytest.approx(probe.val_score)
    Xr, yr, ur = planted(4, "regression")
    probe = fit_diffmean(Xr[SIGNAL_LAYER, :300], yr[:300], Xr[SIGNAL_LAYER, 300:], yr[300:])
    assert probe.direction() @ ur > 0.85 and probe.val_score > 0.1  # the distractor leaks into its projection


@pytest.mark.parametrize("params", [RfmParams(reg=1e-2, bandwidth=7.0, exponent=1.2, center_grads=True, iters=4),
                                    RfmSearch(budget=3, seed=5)])
def test_rfm_matches_xrfm_called_directly(params):
    from xrfm import RFM
    from xrfm.rfm_src.class_conversion import ClassificationConverter

    X, y, _ = planted(5, "classification", N=240)
    Xl = X[SIGNAL_LAYER]
    Xt, yt, Xv, yv, Xq = Xl[:160], y[:160], Xl[160:220], y[160:220], Xl[220:]
    probe = fit_rfm(Xt, yt, Xv, yv, params=params, device="cpu")
    p = probe.params  # the configuration used (the search's pick, for a search)
    sc = probe.scaler
    np.testing.assert_allclose(sc(Xq), (Xq - Xt.mean(0, dtype=np.float64)) / sc.scale, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    model = RFM(kernel="l2", bandwidth=p.bandwidth, exponent=p.exponent, iters=p.iters, device="cpu",
                verbose=False, tuning_metric="mse", class_converter=ClassificationConverter("zero_one", n_classes=2))

    def t(a):
        return torch.from_numpy(np.asarray(a, dtype=np.float32))

    model.fit((t(sc(Xt)), t(yt)[:, None]), (t(sc(Xv)), t(yv)[:, None]), iters=p.iters, reg=p.reg,
              center_grads=p.center_grads, get_agop_best_model=True)
    np.testing.assert_allclose(probe.predict(Xq), model.predict(t(sc(Xq)))[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    assert probe.best_iter == model.best_iter
    np.testing.assert_allclose(probe.agop, model.agop_best_model.double().numpy(), rtol=1e-5, atol=1e-7)
    top = np.linalg.eigh(model.agop_best_model.double().numpy())[1][:, -1]
    assert abs(probe.direction() @ top) == pytest.approx(1.0, abs=1e-5)


def test_rfm_search_is_deterministic():
    X, y, _ = planted(6, "regression", N=200)
    args = (X[SIGNAL_LAYER, :150], y[:150], X[SIGNAL_LAYER, 150:], y[150:])
    a = fit_rfm(*args, params=RfmSearch(budget=3, seed=2), device="cpu")
    b = fit_rfm(*args, params=RfmSearch(budget=3, seed=2), device="cpu")
    assert a.params == b.params and np.array_equal(a.direction(), b.direction())
    assert len(a.trials) == 3 and a.trials[0]["reg"] == RfmParams().reg
    assert RfmSearch(budget=4, seed=1).trials() != RfmSearch(budget=4, seed=2).trials()


def test_the_musicrfm_recipe_follows_its_code():
    """MusicRFM's search: 100 draws at every layer, other draws at each layer, none fixed,
    kernel l2_high_dim on raw features, 8 iterations, kept by validation AUC."""
    mr, ours = recipe("musicrfm"), recipe("musicsteer")
    assert mr.budget == 100 and ours.budget == 8 and recipe("musicrfm", budget=5).budget == 5
    base = mr.base
    assert (base.kernel, base.median_distance, base.iters, base.tuning_metric) == ("l2_high_dim", None, 8, "auc")
    assert (mr.reg, mr.bandwidth, mr.exponent, mr.center_grads) == ((1e-5, 10.0), (1.0, 100.0), (0.7, 1.4),
                                                                      (False, True))
    t0, t1 = mr.for_layer(0).trials(), mr.for_layer(1).trials()
    assert len(t0) == 100 and t0 != t1 and base not in t0
    assert mr.for_layer(3).trials() == mr.for_layer(3).trials()  # seeded
    assert ours.for_layer(0).trials() == ours.for_layer(5).trials() and ours.trials()[0] == RfmParams()
    assert set(RECIPES) == {"musicsteer", "musicrfm"}
    with pytest.raises(ProbeError, match="use one of musicsteer, musicrfm"):
        recipe("paper")


def test_the_musicrfm_recipe_keeps_the_trial_with_the_best_validation_auc():
    from xrfm import RFM
    from xrfm.rfm_src.class_conversion import ClassificationConverter

    X, y, u = planted(7, "classification", N=240)
    Xl = X[SIGNAL_LAYER]
    Xt, yt, Xv, yv = Xl[:160], y[:160], Xl[160:], y[160:]
    probe = fit_rfm(Xt, yt, Xv, yv, params=recipe("musicrfm", budget=4, seed=1).for_layer(0), device="cpu")
    assert probe.scaler.scale == 1.0  # raw features (centred: the kernel sees differences only)
    assert probe.val_score == max(t["val_score"] for t in probe.trials)
    assert probe.val_score == pytest.approx(auc(yv, probe.predict(Xv)))
    p = probe.params
    model = RFM(kernel="l2_high_dim", bandwidth=p.bandwidth, exponent=p.exponent, iters=8, device="cpu",
                verbose=False, tuning_metric="auc", class_converter=ClassificationConverter("zero_one", n_classes=2))

    def t(a):
        return torch.from_numpy(np.asarray(a, dtype=np.float32))

    mean = Xt.mean(0, dtype=np.float64)
    model.fit((t(Xt - mean), t(yt)[:, None]), (t(Xv - mean), t(yv)[:, None]), iters=8, reg=p.reg,
              center_grads=p.center_grads, get_agop_best_model=True, early_stop_multiplier=1.1, top_k=1)
    np.testing.assert_allclose(probe.predict(Xv), model.predict(t(Xv - mean))[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    assert abs(probe.direction() @ u) > 0.9
    # the project's recipe keeps the lowest validation MSE instead
    ours = fit_rfm(Xt, yt, Xv, yv, params=RfmSearch(budget=3, seed=1), device="cpu")
    assert ours.val_loss == min(t["val_loss"] for t in ours.trials)


# -- train_pack on a synthetic feature store -------------------------------------------------


def write_store(d, pooled, rows, model_id="synthetic"):
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "pooled.npy", pooled.astype(np.float32))
    with open(d / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clip", "family", "label", "value", "program"])
        w.writerows(rows)
    L, _, D = pooled.shape
    (d / "meta.json").write_text(json.dumps({"model": {"id": model_id, "layers": L, "hidden": D},
                                             "conditioning": {"prompt": "music"}, "dataset": "synthetic"}))
    return d


CHORDS = ["major", "minor", "dim 7"]


def synthetic_store(d, L=3, D=32, per_label=80, n_tempo=160, programs=8, seed=0):
    """chords (3 labels, planted at layer 1) and tempos (a value, planted at layer 2)."""
    rng = np.random.default_rng(seed)
    dirs = {lab: _orth(rng, D, []) for lab in CHORDS}
    t_dir = _orth(rng, D, [])
    rows, feats = [], []
    for lab in CHORDS:
        for i in range(per_label):
            rows.append([f"chords/{lab}/{i}.wav", "chords", lab, "", f"prog{i % programs}"])
            x = rng.normal(size=(L, D)) + 2.0
            x[1] += 4.0 * dirs[lab]
            feats.append(x)
    values = rng.uniform(50, 210, n_tempo)
    for i, v in enumerate(values):
        rows.append([f"tempos/{i}.wav", "tempos", f"{v:.0f}bpm", f"{v:.3f}", f"prog{i % programs}"])
        x = rng.normal(size=(L, D))
        x[2] += 8.0 * (v - 130) / 80 * t_dir
        feats.append(x)
    pooled = np.stack(feats, axis=1)  # (L, N, D)
    return write_store(d, pooled, rows), dirs, t_dir, pooled, rows


def test_train_pack_writes_a_loadable_pack(tmp_path):
    store, dirs, _t_dir, pooled, rows = synthetic_store(tmp_path / "features")
    pack = train_pack(store, method="rfm", budget=2, seed=0, out_dir=tmp_path / "pack", progress=False,
                      device="cpu")
    for f in ("directions.safetensors", "concepts.json", "evaluation.csv", "scores.png"):
        assert (tmp_path / "pack" / f).stat().st_size > 0
    again = ConceptPack.load(tmp_path / "pack")
    assert again.names == ["chords-dim-7", "chords-major", "chords-minor", "tempos"] == pack.names
    assert again.meta["model"] == {"id": "synthetic", "layers": 3, "hidden": 32}
    assert again.meta["method"] == "rfm" and "sign" in again.meta
    info = {c["name"]: c for c in again.meta["concepts"]}
    assert info["chords-dim-7"]["label"] == "dim 7" and info["tempos"]["task"] == "regression"
    assert len(info["chords-major"]["layers"]) == 3 and "bandwidth" in info["chords-major"]["layers"][0]
    split = again.meta["data"]["families"]["chords"]["split"]
    assert split["grouped_by_program"] is True
    for c in again.concepts.values():
        torch.testing.assert_close(c.directions.norm(dim=-1), torch.ones(3))
        assert c.scores.shape == (3,)
    chords = np.flatnonzero(np.array([r[1] for r in rows]) == "chords")
    for lab in CHORDS:
        c = again[f"chords-{lab.replace(' ', '-')}"]
        assert int(c.scores.argmax()) == 1 and c.scores[1] > 0.95
        v = c.directions[1].numpy()
        ideal = dirs[lab] - sum(dirs[o] for o in CHORDS if o != lab) / 2  # one-vs-rest difference of means
        assert v @ ideal / np.linalg.norm(ideal) > 0.8
        proj = pooled[1, chords] @ v  # sign convention: the concept's clips project higher
        is_lab = np.array([rows[i][2] == lab for i in chords])
        assert proj[is_lab].mean() > proj[~is_lab].mean()
        assert c.targets is not None and c.targets[1] == pytest.approx(proj[is_lab].mean(), rel=0.2)
    tempo = again["tempos"]
    assert int(tempo.scores.argmax()) == 2 and tempo.scores[2] > 0.8 and tempo.targets is None
    t_rows = np.flatnonzero(np.array([r[1] for r in rows]) == "tempos")
    vals = np.array([float(rows[i][3]) for i in t_rows])
    assert np.corrcoef(pooled[2, t_rows] @ tempo.directions[2].numpy(), vals)[0, 1] > 0.8
    ev = again.meta["evaluation"]["chords"]
    assert ev["metric"] == "accuracy" and len(ev["scores"]) == 3 and ev["scores"][1] > 0.8 and ev["scores"][0] < 0.6
    table = evaluation_table(again)
    assert {(r["family"], r["metric"]) for r in table} == {("chords", "accuracy"), ("tempos", "r2")}


def test_train_pack_linear_subset_and_methods(tmp_path):
    store, dirs, *_ = synthetic_store(tmp_path / "features")
    pack = train_pack(store, concepts=["chords-minor"], method="linear", progress=False, evaluate=False)
    assert pack.names == ["chords-minor"] and pack.meta["evaluation"] == {}
    ideal = dirs["minor"] - (dirs["major"] + dirs["dim 7"]) / 2
    assert pack["chords-minor"].directions[1].numpy() @ ideal / np.linalg.norm(ideal) > 0.8
    pack = train_pack(store, families=["chords"], method="diffmean", progress=False)
    assert pack.names == ["chords-dim-7", "chords-major", "chords-minor"]
    with pytest.raises(ProbeError, match="regression family"):
        train_pack(store, method="logistic", progress=False)
    with pytest.raises(ProbeError, match="no concept 'chords-sus4'"):
        train_pack(store, concepts=["chords-sus4"], progress=False)


# -- bad input --------------------------------------------------------------------------------


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    assert isinstance(excinfo.value, MusicsteerError)
    return msg


def test_bad_feature_stores(tmp_path):
    with pytest.raises(ProbeError, match="does not exist") as e:
        train_pack(tmp_path / "nowhere", progress=False)
    one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match="pooled.npy is missing") as e:
        train_pack(tmp_path / "empty", progress=False)
    one_line(e)

    store, _, _, pooled, rows = synthetic_store(tmp_path / "short")
    write_store(store, pooled, rows[:-1])
    with pytest.raises(ProbeError, match=r"index.csv has 399 rows but pooled.npy holds 400 clips") as e:
        train_pack(store, progress=False)
    one_line(e)

    single = [r[:2] + ["major"] + r[3:] if r[1] == "chords" else r for r in rows]
    write_store(tmp_path / "single", pooled, single)
    with pytest.raises(ProbeError, match="family 'chords' has a single label 'major'") as e:
        train_pack(tmp_path / "single", progress=False)
    one_line(e)

    lonely = [list(r) for r in rows]
    lonely[0][2] = "sus4"
    write_store(tmp_path / "lonely", pooled, lonely)
    with pytest.raises(ProbeError, match="'sus4' of family 'chords' has 1 clip") as e:
        train_pack(tmp_path / "lonely", families=["chords"], progress=False)
    one_line(e)

    write_store(tmp_path / "shape", pooled, rows)
    (tmp_path / "shape" / "meta.json").write_text(json.dumps({"model": {"id": "x", "layers": 4, "hidden": 32}}))
    with pytest.raises(ProbeError, match="says 4 layers") as e:
        train_pack(tmp_path / "shape", progress=False)
    one_line(e)

    (tmp_path / "junk").mkdir()
    for f in ("pooled.npy", "index.csv", "meta.json"):
        (tmp_path / "junk" / f).write_text("junk")
    with pytest.raises(ProbeError, match="cannot read") as e:
        train_pack(tmp_path / "junk", progress=False)
    one_line(e)

    with pytest.raises(ProbeError, match="no family 'scales'"):
        train_pack(store.parent / "single", families=["scales"], progress=False)


def test_probe_inputs_are_checked():
    X = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    with pytest.raises(ProbeError, match="single class") as e:
        fit_ridge(X[:30], np.ones(30), X[30:], np.r_[np.ones(5), np.zeros(5)], task="classification")
    one_line(e)
    with pytest.raises(ProbeError, match="single class"):
        fit_rfm(X[:30], np.zeros(30), X[30:], np.r_[np.ones(5), np.zeros(5)], task="classification")
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ProbeError, match="non-finite"):
        fit_diffmean(bad[:30], np.r_[np.ones(15), np.zeros(15)], X[30:], np.r_[np.ones(5), np.zeros(5)])
    with pytest.raises(ProbeError, match="need 0/1 labels"):
        fit_logistic(X[:30], np.arange(30.0), X[30:], np.arange(10.0))


def test_train_pack_with_the_musicrfm_recipe(tmp_path):
    store, *_ = synthetic_store(tmp_path / "features", per_label=40, n_tempo=60)
    pack = train_pack(store, method="rfm", budget=2, seed=0, progress=False, device="cpu", recipe_name="musicrfm",
                      families=["chords"])
    hyper = pack.meta["hyperparameters"]
    assert hyper["recipe"] == "musicrfm" and "validation score (AUC" in hyper["selection"]
    assert hyper["search"]["per_layer"] == "other draws at every layer"
    regs = [layer["reg"] for layer in pack.meta["concept_info"]["chords-major"]["layers"]]
    assert len(set(regs)) == 3  # each layer drew its own trials
    assert int(pack["chords-major"].scores.argmax()) == 1
    with pytest.raises(ProbeError, match="an RFM search"):
        train_pack(store, method="linear", progress=False, recipe_name="musicrfm")
