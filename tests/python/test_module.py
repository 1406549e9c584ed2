"""The package itself: importable from the build tree by Debian's python3, documented (help,
docstrings, type hints), and typed at its boundary."""
import subprocess

from conftest import PYTHON


def test_importable_from_the_build_tree_with_docs_and_hints(python_run, python_path):
    out = python_run("""
        import gpuslot, pydoc, inspect
        print(gpuslot.__file__)
        text = pydoc.render_doc(gpuslot, renderer=pydoc.plaintext)
        for name in ("select_best_gpu", "resolve_device", "lease", "status", "WorkerPool", "NoGpuAvailable"):
            assert name in text, name
        for name in gpuslot.__all__:
            assert getattr(gpuslot, name).__doc__, name
        print(inspect.signature(gpuslot.select_best_gpu))
        print(inspect.signature(gpuslot.resolve_device))
        print(inspect.signature(gpuslot.WorkerPool))
        print(issubclass(gpuslot.BadInput, ValueError), issubclass(gpuslot.Timeout, TimeoutError),
              issubclass(gpuslot.NvmlUnavailable, gpuslot.NoGpuAvailable))
    """).stdout.splitlines()
    assert out[0] == str(python_path / "gpuslot" / "__init__.py")
    assert out[1] == "(min_free_memory_gb=8.0, exclude_gpus=None, strategy='most-free')"
    assert out[2] == "(spec=None, env='GPUSLOT_DEVICE', min_free_memory_gb=None, strategy='most-free')"
    assert out[3].startswith("(init, work, mem='4G', gpus=None, retries=3")
    assert out[4] == "True True True"
    stub = (python_path / "gpuslot" / "__init__.pyi").read_text()
    for signature in ("def select_best_gpu(", "def resolve_device(", "def lease(", "def status(", "class WorkerPool("):
        assert signature in stub
    assert (python_path / "gpuslot" / "py.typed").exists()


def test_the_type_hints_parse_and_name_what_the_module_has(python_path):
    out = subprocess.run([PYTHON, "-c", """
import ast, sys
sys.path.insert(0, %r)
import gpuslot
tree = ast.parse(open(%r).read())
names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
missing = sorted(name for name in names if not hasattr(gpuslot, name))
print(missing)
""" % (str(python_path), str(python_path / "gpuslot" / "__init__.pyi"))], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
