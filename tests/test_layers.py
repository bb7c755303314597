"""The layers of DESIGN.md hold: the import contracts in pyproject.toml (import-linter), and
what they mean at run time (model/ and the tokenizer registry import no modality; loading
a model folder of any modality goes through healthfm.load, which imports it)."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import healthfm
from healthfm.errors import ModelError
from healthfm.modalities import MODALITIES as MODALITY_NAMES
from healthfm.tokenizer import TOKENIZER_FORMAT_VERSION, tokenizer_from_dict

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
#: The one list of modalities (healthfm.modalities), as module names.
MODALITIES = tuple(f"healthfm.{name}" for name in MODALITY_NAMES)
#: What model/ may import of healthfm, besides itself (the layers below it).
BELOW_MODEL = {"errors", "fsutil", "tokenizer"}


def _env() -> dict[str, str]:
    # The tree under test, not whichever healthfm the environment has installed.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def _contracts() -> list[dict]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["importlinter"]["contracts"]


def test_import_contracts_hold():
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.skip(
            "import-linter is not installed (pip install -e '.[test]'): the import contracts "
            "of pyproject.toml were not checked"
        )
    run = subprocess.run(
        [str(exe), "--no-cache", "--no-logo"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_model_contract_forbids_every_other_top_level_module():
    # A new top-level module must join the forbidden list of the model/ contract.
    (contract,) = [c for c in _contracts() if c["id"] == "model-imports-nothing-above"]
    tops = {m.name for m in pkgutil.iter_modules([str(SRC / "healthfm")])}
    expected = {f"healthfm.{name}" for name in tops - BELOW_MODEL - {"model"}}
    assert set(contract["forbidden_modules"]) == expected


def test_contracts_list_every_modality_and_no_ignore():
    # The contracts' modality lists are the one list (healthfm.modalities), and no
    # contract needs an ignore_imports exception.
    contracts = {c["id"]: c for c in _contracts()}
    assert set(contracts["modalities-independent"]["modules"]) == set(MODALITIES)
    assert set(contracts["modalities-below-stages"]["source_modules"]) == set(MODALITIES)
    assert set(MODALITIES) <= set(contracts["contract-imports-no-evaluation"]["forbidden_modules"])
    assert set(MODALITIES) <= set(contracts["acyclic-siblings"]["ancestors"])
    for contract in contracts.values():
        assert "ignore_imports" not in contract, contract["id"]
    # Every modality package on disk is in the list, and each keeps its class in modality.py.
    packages = {
        m.name
        for m in pkgutil.iter_modules([str(SRC / "healthfm")])
        if m.ispkg and (SRC / "healthfm" / m.name / "modality.py").is_file()
    }
    assert packages == set(MODALITY_NAMES)
    assert healthfm.modality_names() == sorted(MODALITY_NAMES)


def _import_graph() -> dict[str, set[str]]:
    # Every import between healthfm's files (package __init__s included, imports inside
    # functions included), as grimp (import-linter's graph builder) reads them.
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("healthfm", cache_dir=None)
    return {
        module: {
            m for m in graph.find_modules_directly_imported_by(module) if m.startswith("healthfm")
        }
        for module in graph.modules
        if module.startswith("healthfm")
    }


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_tarjan_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_any_two_files():
    # Issue 22: 16 files sat in import cycles (the registry's loaders, the modality
    # contract's default hooks, pathology's package and its demo). None may come back.
    assert _cycles(_import_graph()) == []


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300
    )


def test_model_and_tokenizer_import_no_modality_at_run_time(tmp_path):
    run = _python(
        "import json, sys\n"
        "from healthfm.model import FoundationModel, ModelConfig\n"
        "from healthfm.model.pretrained import load, save_pretrained\n"
        "import healthfm.tokenizer, healthfm.tokens\n"
        "m = FoundationModel(ModelConfig(modality='test', vocab_size=8, d_model=16, n_heads=2,"
        " d_ff=32, n_layers=1))\n"
        f"load(save_pretrained(m, {str(tmp_path / 'm')!r}))\n"
        "top = {'.'.join(n.split('.')[:2]) for n in sys.modules if n.startswith('healthfm.')}\n"
        "print(json.dumps(sorted(top)))\n"
    )
    assert run.returncode == 0, run.stderr
    imported = set(json.loads(run.stdout.strip().splitlines()[-1]))
    assert imported.isdisjoint((*MODALITIES, "healthfm.pipeline", "healthfm.demo")), imported


def test_healthfm_load_imports_the_model_modality(tmp_path):
    # A pathology (MAE) model folder, loaded in a fresh process: the model layer alone does
    # not know the "mae" objective; healthfm.load imports the modality that registers it.
    from healthfm.model import FoundationModel, ModelConfig
    from healthfm.model.pretrained import save_pretrained
    from healthfm.pathology.tokenizer import PatchTokenizer

    tok = PatchTokenizer(16, 8)
    config = ModelConfig(
        modality="pathology",
        vocab_size=tok.vocab_size,
        d_model=16,
        n_layers=1,
        n_heads=2,
        d_ff=32,
        max_len=tok.n_tokens,
        objective="mae",
        input_dim=tok.input_dim,
    )
    folder = save_pretrained(FoundationModel(config), tmp_path / "mae", tokenizer=tok)
    run = _python(
        "import sys\n"
        "import healthfm\n"
        "from healthfm.errors import ModelError\n"
        "from healthfm.model.pretrained import load\n"
        "try:\n"
        f"    load({str(folder)!r})\n"
        "except ModelError as exc:\n"
        "    print('refused:', exc)\n"
        f"model = healthfm.load({str(folder)!r})\n"
        "print(model.config.objective, type(model.tokenizer).__name__, model.model_hash[:8])\n"
    )
    assert run.returncode == 0, run.stderr
    refused, loaded = run.stdout.strip().splitlines()[-2:]
    assert "unknown objective 'mae'; registered: causal, masked" in refused
    assert "config.json" in refused and "'objective'" in refused
    assert loaded.startswith("mae PatchTokenizer ")


def test_unknown_tokenizer_type_is_named():
    data = {"format_version": TOKENIZER_FORMAT_VERSION, "type": "nope.kmer", "config": {}}
    with pytest.raises(ModelError, match=r"unknown tokenizer type 'nope\.kmer'") as err:
        tokenizer_from_dict(data, source="tokenizer.json")
    assert err.value.column == "type"


def test_version_comes_from_the_installed_metadata():
    from importlib.metadata import version

    assert healthfm.__version__ == version("healthfm")
