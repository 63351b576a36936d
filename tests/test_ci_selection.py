"""The VM stage's test selection (`ci_selection` in .ci/vm-inside) names tests that exist: a
renamed test or parameter would otherwise fail the VM stage only, half an hour into CI."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def _ci_selection() -> list[str]:
    script = ('source <(sed -n "/^ci_selection=(/,/^)/p" .ci/vm-inside); '
              'printf "%s\\n" "${ci_selection[@]}"')
    listed = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=10, check=True)
    return [line for line in listed.stdout.splitlines() if line]


def test_every_test_the_vm_stage_selects_is_collected() -> None:
    selection = _ci_selection()
    assert len(selection) >= 5, selection
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *selection], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
    for entry in selection:  # each entry selects at least one test
        assert entry.split("[")[0] in collected.stdout, entry
