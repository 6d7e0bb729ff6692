"""The layout's rules, each a test (docs/design.md §2): the top-level ``kernels/`` never shadows
Hugging Face's installed ``kernels`` package, lightllm's Triton sources import only as
``lightllm.kernels`` (in this checkout, a wheel and an sdist alike), and no layer imports upwards."""

import ast
import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))


def _not_ours(path) -> bool:
    """True for a file outside the checkout's kernels/ folder (the virtualenv may sit inside the
    checkout, as make's .venv does)."""
    return ROOT / "kernels" not in pathlib.Path(path).resolve().parents


def _run(args, cwd, env=None, timeout=300):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


def test_installed_kernels_package_wins_in_the_test_process():
    """pytest puts the root first on sys.path (pyproject's pythonpath), as a user's `python -m`
    from the root does: `kernels` must still be Hugging Face's, and transformers' hub integration,
    which imports names from it, must load."""
    import kernels
    import transformers.integrations.hub_kernels  # noqa: F401

    import lightllm.kernels.attention

    assert str(ROOT) in [os.path.abspath(p or ".") for p in sys.path]
    assert kernels.__file__ is not None and _not_ours(kernels.__file__), kernels.__file__
    assert hasattr(kernels, "kernelize")
    assert pathlib.Path(lightllm.kernels.attention.__file__).resolve() == ROOT / "kernels" / "attention.py"


def test_installed_kernels_package_wins_from_the_repository_root():
    """A fresh interpreter started in the root (sys.path[0] is the root): transformers' hub
    integration imports, lightllm registers its attention implementation without a warning, and
    the checkout's kernel files are not reachable as a top-level `kernels.*`."""
    code = """if True:
        import os, sys, warnings
        warnings.simplefilter("error")
        assert os.path.abspath(sys.path[0] or ".") == os.getcwd()
        import transformers.integrations.hub_kernels
        import lightllm, kernels
        from transformers import AttentionInterface
        assert "lightllm" in AttentionInterface._global_mapping
        print(kernels.__file__)
        try:
            import kernels.attention
        except ImportError:
            print("no kernels.attention")
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = _run([sys.executable, "-c", code], cwd=ROOT, env=env).stdout.split("\n")
    assert _not_ours(out[0]), out[0]
    assert out[1] == "no kernels.attention"


def test_kernel_sources_refuse_a_top_level_name():
    """Where no `kernels` is installed the root's folder is a namespace portion: its modules then
    refuse to load under that name rather than run a second copy of the kernels."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernels._utils", ROOT / "kernels" / "_utils.py")
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "kernels"
    with pytest.raises(ImportError, match="import as lightllm.kernels"):
        spec.loader.exec_module(module)
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "lightllm" / "kernels").is_symlink()
    assert (ROOT / "lightllm" / "kernels").resolve() == ROOT / "kernels"


def test_import_lightllm_does_not_load_transformers():
    code = "import sys, lightllm; print('transformers' in sys.modules)"
    assert _run([sys.executable, "-c", code], cwd="/").stdout.strip() == "False"


def _copy_checkout(dest: pathlib.Path) -> None:
    """The files git knows (tracked, or untracked and not ignored), links kept as links."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                  cwd=ROOT).stdout.split("\0")
    for rel in filter(None, listed):
        src, dst = ROOT / rel, dest / rel
        if not os.path.lexists(src):
            continue  # deleted in the working tree, not yet committed
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            dst.write_bytes(src.read_bytes())


def _clean_env_with(wheel: pathlib.Path, where: pathlib.Path) -> pathlib.Path:
    """A new virtualenv holding only ``wheel``; torch and triton come from this interpreter's
    site-packages through a path file (its own .pth files, the editable install's among them,
    are not read there)."""
    import site
    import sysconfig

    _run([sys.executable, "-m", "venv", "--without-pip", str(where)], cwd=where.parent)
    python = where / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=where).stdout.strip()
    deps = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    pathlib.Path(purelib, "deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
          "--no-index", str(wheel)], cwd=where)
    return python


IMPORT_EVERY_KERNEL = """if True:
    import importlib, os, sys
    import kernels, lightllm.kernels
    names = sys.argv[1].split(",")
    for name in names:
        module = importlib.import_module("lightllm.kernels." + name[:-3])
        assert module.__file__.startswith(sys.prefix), module.__file__
    print(kernels.__file__)
"""


@pytest.mark.xdist_group("packaging")
def test_wheel_and_sdist_hold_the_kernels(tmp_path):
    """`python -m build` of a copy of the checkout: the sdist, the wheel built from it and a wheel
    built from the checkout directly each hold every kernel file as lightllm/kernels/*.py (plain
    files, no top-level `kernels`), and each wheel imports them in a clean environment."""
    pytest.importorskip("build")
    src = tmp_path / "checkout"
    _copy_checkout(src)
    env = dict(os.environ, LIGHTLLM_SKIP_EXT="1")  # the extension is not what is checked here
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "from_sdist"),
          str(src)], cwd=tmp_path, env=env)
    _run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir",
          str(tmp_path / "direct"), str(src)], cwd=tmp_path, env=env)

    (sdist,) = (tmp_path / "from_sdist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
    for name in KERNEL_FILES:
        assert members[f"lightllm/kernels/{name}"].isfile(), name

    wheels = [*(tmp_path / "from_sdist").glob("*.whl"), *(tmp_path / "direct").glob("*.whl")]
    assert len(wheels) == 2
    for i, wheel in enumerate(wheels):
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
        assert {f"lightllm/kernels/{n}" for n in KERNEL_FILES} <= names, wheel.name
        assert "lightllm/integrations/kernel_repository/metadata.json" in names, wheel.name
        assert not any(n.startswith("kernels/") for n in names), wheel.name
        python = _clean_env_with(wheel, tmp_path / f"env{i}")
        out = _run([str(python), "-c", IMPORT_EVERY_KERNEL, ",".join(KERNEL_FILES)],
                   cwd=tmp_path).stdout.strip()
        assert _not_ours(out), out  # Hugging Face's kernels, beside lightllm's


# ------------------------------------------------------------------------------------------------
# Layers: what each part of the package may import (docs/design.md §2)
# ------------------------------------------------------------------------------------------------

# The lightllm layers each layer may import besides itself. A new top-level module must be added.
MAY_IMPORT = {
    "kernels": set(),
    "reference": set(),
    "_validation": set(),
    "_dispatch": set(),
    "ops": {"kernels", "reference", "_dispatch", "_validation", "_C"},
    "functional": {"ops"},
    "nn": {"ops", "functional", "reference", "_dispatch", "_validation"},
    "integrations": {"nn", "ops", "functional", "_dispatch", "_validation"},
    "patch": {"integrations", "nn", "ops", "functional", "_dispatch"},
    "models": {"nn", "ops", "functional", "reference", "_dispatch", "_validation"},
    "generate": {"models", "nn", "ops", "functional", "_dispatch"},
    # The entry points and the test helpers see everything.
    "__init__": None, "env": None, "testing": None,
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, "lightllm")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: pathlib.Path, module: str):
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            # `from lightllm import ops` imports lightllm.ops; `from lightllm.ops import x` the op.
            yield from ([f"{base}.{a.name}" for a in node.names] if base == "lightllm" else [base])


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_layer_imports_upwards():
    files = [*(ROOT / "kernels").glob("*.py"),
             *(p for p in (ROOT / "lightllm").rglob("*.py") if "kernels" not in p.parts)]
    assert len(files) > 30
    wrong = []
    for path in files:
        me = _module_name(path)
        assert _layer(me) in MAY_IMPORT, f"{path}: a new layer; say in MAY_IMPORT what it may import"
        allowed = MAY_IMPORT[_layer(me)]
        for target in _imported(path, me):
            if target.split(".")[0] == "lightllm" and _layer(target) != _layer(me):
                if allowed is not None and _layer(target) not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not wrong, wrong


def test_the_layer_check_sees_a_wrong_import(tmp_path):
    """The check above can fail: an op importing a module is caught."""
    bad = ROOT / "lightllm" / "ops" / "norm.py"
    source = bad.read_text() + "\nfrom lightllm.nn import LayerNorm\nfrom ..models import GPT\n"
    fake = tmp_path / "norm.py"
    fake.write_text(source)
    targets = set(_imported(fake, "lightllm.ops.norm"))
    assert {"lightllm.nn", "lightllm.models"} <= targets
    assert not {_layer(t) for t in targets if t.startswith("lightllm")} <= MAY_IMPORT["ops"] | {"ops"}


# ------------------------------------------------------------------------------------------------
# The suite's own set-up
# ------------------------------------------------------------------------------------------------


@pytest.mark.xdist_group("smollm2")
def test_xdist_groups_take_effect(request):
    """Under `make test` (pytest-xdist, --dist loadgroup) a test marked with an xdist_group runs
    in its group's worker, so the expensive fixtures of a group (the SmolLM2 load, the sm_90a
    compile table) are built once. pytest 9.2 with pytest-xdist 3.8 silently drops the groups
    (xdist renames items through an attribute pytest 9.2 no longer reads): the constraints pin a
    pair that works."""
    # A worker's own `dist` option reads "no"; xdist leaves the mode in `loadgroup` there.
    if not os.environ.get("PYTEST_XDIST_WORKER") or not getattr(request.config.option,
                                                                "loadgroup", False):
        pytest.skip("runs under pytest-xdist with --dist loadgroup (make test)")
    assert request.node.nodeid.endswith("@smollm2"), request.node.nodeid
