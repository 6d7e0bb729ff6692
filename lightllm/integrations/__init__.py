"""What ``lightllm.patch`` knows how to swap, one file per ecosystem: ``torch_nn`` (PyTorch's own
modules) and ``hugging_face`` (transformers models, imported only once transformers is), with
``kernel_hub`` offering the same Hugging Face knowledge through transformers' own kernel mechanism
(imported only on request).

``install()`` (called by ``import lightllm``) registers the ``"lightllm"`` attention implementation
with transformers: at once if transformers is already imported, else right after it is, through
an import hook, so ``from_pretrained(..., attn_implementation="lightllm")`` works after
``import lightllm`` in either order and a user who never imports transformers never loads it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


def _register_hugging_face() -> None:
    try:
        from . import hugging_face

        hugging_face.register()
    except Exception as e:  # an incompatible transformers must not break `import lightllm`
        warnings.warn(f"lightllm: could not register the 'lightllm' attention implementation "
                      f"with transformers ({type(e).__name__}: {e})", stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` once the top-level module ``name`` has been executed."""

    def __init__(self, name: str, callback) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module
        callback = self.callback

        def exec_module(module):
            loader_exec(module)
            callback()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if "transformers" in sys.modules:
        _register_hugging_face()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport("transformers", _register_hugging_face))
