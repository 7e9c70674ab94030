"""The training notebook: display only (the package does the work), safe by default, and run
headless with papermill in the local profile against a real MLflow server. The cloud profile
runs in tests/test_ecs_parity.py, where the notebook instance's environment exists."""

from __future__ import annotations

import ast
import json
import re
import subprocess

import httpx
import pytest
from mlflow import MlflowClient

from hm_mlflow import notebook

from support import BIN, NOTEBOOK, executed_text

FORBIDDEN_IMPORTS = {"cv2", "sklearn", "skops", "joblib", "numpy", "scipy", "PIL"}


def code_cells() -> list[dict]:
    return [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]


def test_there_is_one_training_notebook():
    notebooks = sorted(
        p.relative_to(NOTEBOOK.parents[1])
        for p in NOTEBOOK.parent.rglob("*.ipynb")
        if ".ipynb_checkpoints" not in p.parts
    )
    assert [str(p) for p in notebooks] == ["jupyter/training_notebook.ipynb"]


def test_parameters_cell_holds_the_profile_and_a_few_values():
    (parameters,) = [c for c in code_cells() if "parameters" in c["metadata"].get("tags", [])]
    assigned = [
        node.targets[0].id
        for node in ast.parse("".join(parameters["source"])).body
        if isinstance(node, ast.Assign)
    ]
    assert assigned[0] == "PROFILE" and 'PROFILE = "local"' in "".join(parameters["source"])
    assert len(assigned) <= 6


def test_the_notebook_defines_no_feature_or_training_code():
    """Display only: no function, class or lambda of its own, nothing that computes features
    or fits models imported; every step is a call into hm_mlflow."""
    for cell in code_cells():
        tree = ast.parse("".join(cell["source"]))
        for node in ast.walk(tree):
            assert not isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda
            ), f"the notebook defines code of its own:\n{''.join(cell['source'])}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = (
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                )
                for module in modules:
                    assert module.split(".")[0] not in FORBIDDEN_IMPORTS, module
                    assert module.split(".")[0] in {"hm_mlflow", "IPython"}, module


def test_a_data_root_without_training_images_is_an_error_naming_it(tmp_path):
    settings = notebook.settings_for("local", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))) as caught:
        notebook.training_root(settings)
    assert "SAMPLE_DEMO" in str(caught.value)
    demo = notebook.training_root(settings.model_copy(update={"state_dir": tmp_path}), True)
    assert (tmp_path / "sample" / "train").is_dir() and demo == str(tmp_path / "sample")


def test_the_cloud_profile_needs_the_instances_environment():
    with pytest.raises(RuntimeError, match="MLFLOW_TRACKING_URI, HM_DATA_DIR"):
        notebook.settings_for("cloud", environ={})
    with pytest.raises(ValueError, match="PROFILE must be one of"):
        notebook.settings_for("laptop", environ={})


@pytest.mark.integration
def test_local_profile_trains_compares_and_decides(trained, sample_root, tmp_path):
    """Against a real MLflow server holding a Production version: a copy of conftest's `trained`
    under a name of its own, so that whatever the gate decides here, the session's model and the
    servers on it are left as they were."""
    session, trained_first = trained
    client = MlflowClient(session.tracking_uri)
    name = f"{session.model_name}-notebook"
    first = client.copy_model_version(f"models:/{session.model_name}/{trained_first.version}", name)
    client.set_registered_model_alias(name, session.model_alias, first.version)
    before = {v.version for v in client.search_model_versions(f"name='{name}'")}
    output = tmp_path / "executed.ipynb"
    done = subprocess.run(
        [
            str(BIN / "papermill"),
            str(NOTEBOOK),
            str(output),
            "-k",
            "python3",
            "--cwd",
            str(NOTEBOOK.parent),
            "-p",
            "CV_FOLDS",
            "3",
            "-p",
            "AUGMENT_COPIES",
            "1",
        ],
        env={
            **__import__("os").environ,
            "MLFLOW_TRACKING_URI": session.tracking_uri,
            "HM_DATA_DIR": str(sample_root),
            "HM_MODEL_NAME": name,
            "HM_WORKERS": "2",
        },
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    after = {v.version for v in client.search_model_versions(f"name='{name}'")}
    (new,) = after - before
    text = executed_text(output)
    assert f"candidate (version {new})" in text and f"production (version {first.version})" in text
    assert re.search(rf"Gate decision: (NOT )?PROMOTED\.\*\* Version {new}: ", text)
    # figures shown inline, and logged to the run under the names the last cell lists
    cells = json.loads(output.read_text())["cells"]
    images = [o for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 7
    run_id = client.get_model_version(name, new).run_id
    logged = sorted(a.path for a in client.list_artifacts(run_id, "notebook"))
    assert len(logged) == len(images)
    for path in logged:
        assert f"`{path}`" in text
    link = re.search(r"\((http://[^)]+/#/models/[^)]+/versions/(\d+))\)", text)
    assert link and link.group(2) == new
    assert httpx.get(link.group(1).split("#")[0]).status_code == 200
