"""scikit-learn estimators and pipelines through the generic codec: identical predictions."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install -e '.[sklearn]')")

from sklearn.decomposition import PCA  # noqa: E402
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from benchmarks.models import sklearn_input, sklearn_knn  # noqa: E402
from modelshare import CopiedOnLoadWarning, SharedModel  # noqa: E402

from ..support import workers as _workers  # noqa: E402
from ..support.pss import MiB, run_shared  # noqa: E402


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1500, 40))
    return x, (x[:, 0] + x[:, 1] > 0).astype(int)


def fitted(name: str) -> Any:
    x, y = _data()
    estimator = {
        "pipeline": lambda: make_pipeline(StandardScaler(), PCA(10), LogisticRegression()),
        "knn": lambda: KNeighborsClassifier(),
        "mlp": lambda: MLPClassifier((128, 64), max_iter=30, random_state=0),
        "forest": lambda: RandomForestClassifier(10, random_state=0),
        "boosting": lambda: HistGradientBoostingClassifier(max_iter=10, random_state=0),
    }[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of the tiny fits
        return estimator.fit(x, y)


@pytest.mark.parametrize("name", ["pipeline", "knn", "mlp", "forest", "boosting"])
def test_predictions_identical(shm_dir: Path, name: str) -> None:
    x, _ = _data()
    expected = fitted(name).predict_proba(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CopiedOnLoadWarning)
        with SharedModel(functools.partial(fitted, name), key=f"sk-{name}").use() as model:
            np.testing.assert_array_equal(model.predict_proba(x), expected)


def test_trees_warn_that_sharing_saves_nothing(shm_dir: Path) -> None:
    says = r"trees .* copy their node arrays.*Server\(copies=N\).*share='threads'.*ONNX does not help"
    with pytest.warns(CopiedOnLoadWarning, match=says):
        with SharedModel(functools.partial(fitted, "forest"), key="sk-forest").use():
            pass


def test_array_based_estimators_are_views(shm_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", CopiedOnLoadWarning)
        with SharedModel(functools.partial(fitted, "mlp"), key="sk-mlp").use() as model:
            big = [w for w in model.coefs_ if w.nbytes >= 1024]  # smaller ones ride in the skeleton
            assert big and all(not w.flags.writeable for w in big), "MLP weights are read-only segment views"


def test_four_processes_share_a_128_mib_knn(shm_dir: Path, spawn) -> None:
    loader = functools.partial(sklearn_knn, 128)
    x = sklearn_input()
    expected = loader().predict_proba(x)
    run = run_shared(spawn, shm_dir, "sklearn.neighbors", _workers.sklearn_use_worker,
                     SharedModel(loader, key="sk-knn-128"), x)
    weights = 128 * MiB
    print(run.report(weights))
    for out in run.outputs:
        np.testing.assert_array_equal(out, expected)
    assert run.total_pss <= run.budget(weights), run.report(weights)
