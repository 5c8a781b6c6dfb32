"""Import first in a subprocess that checks Triton kernels on the CPU: turns on Triton's interpreter and works
around triton 3.6's interpreter calling int() on 1-element arrays (loops over a runtime bound), which numpy >= 2.3
rejects ("only 0-dimensional arrays can be converted"): the patched __index__ reads the element instead."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import triton.runtime.interpreter as _interp  # noqa: E402

_orig_patch = _interp._patch_lang_tensor


def _patch_lang_tensor(tensor, scope):
    _orig_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


_interp._patch_lang_tensor = _patch_lang_tensor
