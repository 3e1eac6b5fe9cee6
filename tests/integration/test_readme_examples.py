"""Every shell example of the README's Endpoints section runs against a live service and succeeds, so the
documentation cannot drift from the service.

The rule for README examples (the format this test can run): in the `## Endpoints` section every ```bash
block is run, in order, by one bash process (variables such as IMG and JOB carry over from block to
block) in an empty working directory, against the small demo model (`SSD_MODEL=ssd-small
SSD_NUM_CLASSES=4 SSD_CLASS_NAMES=shapes`, no token). Commands address the service as `localhost:8000` and run Python as
`.venv/bin/python`; both are rewritten to the live server and this interpreter. Every command must
succeed: bash runs with `set -e -o pipefail` and `curl` with `--fail-with-body`, so any HTTP status of
400 or more fails the test, naming the command. Every `curl` written in the section must actually run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.integration.live import REPO, run_service

pytestmark = pytest.mark.integration

README = REPO / "README.md"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.DOTALL | re.MULTILINE)
SCRIPT_TIMEOUT_S = 300

# curl fails on HTTP >= 400 and logs each call, so the test knows every written curl ran
PRELUDE = """set -e -o pipefail
trap '[[ $BASH_COMMAND == return* ]] || echo "README command failed (exit $?): $BASH_COMMAND" >&2' ERR
curl() {
    local call="curl $*" status=0
    echo "${call//$'\\n'/ }" >> "$CURL_LOG"
    command curl --fail-with-body --show-error --max-time 120 "$@" || status=$?
    if [ "$status" -ne 0 ]; then echo "README command failed (exit $status): $call" >&2; fi
    return "$status"
}
"""


def endpoint_blocks(text: str) -> list[str]:
    """The ```bash blocks of the `## Endpoints` section, in order."""
    section = text.split("\n## Endpoints\n", 1)[1].split("\n## ", 1)[0]
    return BLOCK.findall(section)


def curl_commands(block: str) -> int:
    """How many curl invocations a block writes (outside comments)."""
    code = "\n".join(line.split(" #", 1)[0] for line in block.splitlines() if not line.lstrip().startswith("#"))
    return len(re.findall(r"(?<![\w-])curl\s", code))


def test_the_endpoints_section_has_examples():
    blocks = endpoint_blocks(README.read_text())
    assert len(blocks) >= 6 and sum(map(curl_commands, blocks)) >= 15, blocks


def test_every_readme_endpoint_example_runs(tmp_path):
    blocks = endpoint_blocks(README.read_text())
    expected_curls = sum(map(curl_commands, blocks))
    workdir = tmp_path / "examples"
    workdir.mkdir()
    curl_log = tmp_path / "curl.log"
    with run_service(tmp_path / "service", SSD_CLASS_NAMES="shapes") as service:
        address = service.url.removeprefix("http://")
        script = PRELUDE + "\n".join(
            block.replace("localhost:8000", address).replace(".venv/bin/python", sys.executable) for block in blocks)
        (tmp_path / "examples.sh").write_text(script)
        done = subprocess.run(
            ["bash", str(tmp_path / "examples.sh")], cwd=workdir, capture_output=True, text=True,
            timeout=SCRIPT_TIMEOUT_S, check=False,
            env={**os.environ, "CURL_LOG": str(curl_log), "PYTHONPATH": str(REPO)},
        )
        assert done.returncode == 0, f"stderr:\n{done.stderr[-4000:]}\nstdout:\n{done.stdout[-2000:]}"
    ran = curl_log.read_text().splitlines()
    assert len(ran) == expected_curls, ran
