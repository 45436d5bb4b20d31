"""benchmarks/cpu_kernels.py: each rewrite is switched by `use`, and both forms agree."""

import jax
import numpy as np
import pytest

from benchmarks import cpu_kernels


@pytest.mark.parametrize('name', list(cpu_kernels.REWRITES))
def test_use_installs_each_form_and_both_compute_the_same(name):
  module, attribute, new, old = cpu_kernels.REWRITES[name]
  try:
    cases = [case for case in cpu_kernels.kernel_cases() if case[1] == name]
    assert cases
    for label, _, fn, args in cases:
      # Two examples of each batched argument (the conv kernel and the position table stay).
      small = tuple(a[:2] if a.shape[0] == 32 else a for a in args)
      outputs = {}
      for form, rewritten in (('plain', set()), ('rewritten', {name})):
        cpu_kernels.use(rewritten)
        assert getattr(module, attribute) is (new if rewritten else old)
        outputs[form] = np.asarray(jax.jit(fn)(*small))
      np.testing.assert_allclose(outputs['rewritten'], outputs['plain'], atol=2e-4, err_msg=label)
  finally:
    cpu_kernels.use(set(cpu_kernels.REWRITES))
  assert getattr(module, attribute) is new
