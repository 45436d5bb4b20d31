"""benchmarks/runs.py: the drivers' results.json keeps scored rows and refuses other budgets."""

import json

import pytest

from benchmarks import runs


def _load(path, expected):
  return runs.load_rows(
      str(path), name=lambda row: f"{row['cell']} seed {row['seed']}", expected_overrides=expected
  )


def test_rows_round_trip_and_missing_file(tmp_path):
  path = tmp_path / 'results.json'
  assert _load(path, lambda row: []) == []
  rows = [
      dict(cell='cross_direct', seed=1, overrides=['--a=1'], mpjpe=61.8),
      dict(cell='vanilla_direct', seed=0, mpjpe=70.2),  # written before overrides were kept
  ]
  runs.save_rows(str(path), rows)
  assert json.loads(path.read_text()) == rows
  assert not (tmp_path / 'results.json.tmp').exists()
  assert _load(path, lambda row: ['--a=1']) == rows


def test_rows_of_another_budget_are_refused(tmp_path):
  path = tmp_path / 'results.json'
  runs.save_rows(str(path), [dict(cell='cross_direct', seed=1, overrides=['--steps=200'])])
  with pytest.raises(ValueError, match=r"cross_direct seed 1 was run with \['--steps=200'\]"):
    _load(path, lambda row: ['--steps=300'])
