"""benchmarks/cpu_kernels.py: each rewrite is switched by `use`, and both forms compute the same
value and the same gradients (the rewrites change the backward pass)."""

import jax
import numpy as np
import pytest

from benchmarks import cpu_kernels


@pytest.mark.parametrize('name', list(cpu_kernels.REWRITES))
def test_use_installs_each_form_and_both_have_the_same_gradients(name):
  module, attribute, new, old = cpu_kernels.REWRITES[name]
  try:
    cases = [case for case in cpu_kernels.kernel_cases() if case[1] == name]
    assert cases
    for label, _, fn, args in cases:
      # Two examples of each batched argument (the conv kernel stays).
      small = tuple(a[:2] if a.shape[0] == 32 else a for a in args)
      results = {}
      for form, rewritten in (('plain', set()), ('rewritten', {name})):
        cpu_kernels.use(rewritten)
        assert getattr(module, attribute) is (new if rewritten else old)
        grad, grad_args = cpu_kernels._loss_gradient(fn, small)  # pylint: disable=protected-access
        results[form] = jax.device_get(grad(*grad_args))
      value, grads = results['rewritten']
      np.testing.assert_allclose(value, results['plain'][0], rtol=1e-4, err_msg=label)
      for got, want in zip(grads, results['plain'][1], strict=True):
        np.testing.assert_allclose(got, want, atol=5e-4, rtol=1e-4, err_msg=label)
  finally:
    cpu_kernels.use(set(cpu_kernels.REWRITES))
  assert getattr(module, attribute) is new


def test_the_step_table_has_the_switch_off_first_and_on_last():
  variants = cpu_kernels.step_variants()
  labels = list(variants)
  assert variants[labels[0]] == (False, {'conv'})  # the shipped plain path on a CPU
  assert variants[labels[-1]] == (True, set(cpu_kernels.REWRITES))
