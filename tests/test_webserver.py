"""The real webserver sees the asset graph and the partition statuses (GraphQL)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import requests

from deconflow.partitions import partition_key
from deconflow.sweep import Cell
from tests.helpers import asset, make_defs

pytestmark = pytest.mark.slow  # starts the webserver

REPO = Path(__file__).resolve().parents[1]

QUERY = """
{
  assetNodes {
    assetKey { path } groupName description opVersion
    owners { ... on TeamAssetOwner { team } ... on UserAssetOwner { email } }
  }
  assetNodeOrError(assetKey: {path: ["training_run"]}) {
    ... on AssetNode {
      partitionStats { numMaterialized numPartitions numFailed }
      partitionKeysByDimension { name partitionKeys }
    }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webserver(sweep_env):
    instance = dg.DagsterInstance.get()
    defs = make_defs()
    for cell in (Cell("base", 0.1, 1e-3, 0), Cell("narrow", 0.05, 1e-2, 4)):
        dg.materialize(
            [asset(defs, "training_run")], partition_key=partition_key(cell), instance=instance
        )
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dagster_webserver",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            str(REPO / "workspace.yaml"),
        ],
        cwd=REPO,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/graphql"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok:
                break
        except requests.ConnectionError:
            time.sleep(1)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    else:
        proc.kill()
        pytest.fail("dagster-webserver did not come up in 120 s")
    yield url
    proc.terminate()
    proc.wait(30)


def test_graphql_sees_the_graph_and_partition_statuses(webserver):
    data = None
    for _ in range(60):  # the code location loads in the background
        r = requests.post(webserver, json={"query": QUERY}, timeout=30)
        r.raise_for_status()
        data = r.json()["data"]
        if data["assetNodes"]:
            break
        time.sleep(1)
    keys = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in data["assetNodes"]}
    assert keys == {
        "training_run": "training",
        "runs": "analysis",
        "run_fits": "analysis",
        "run_fit_figures": "analysis",
        "hypotheses": "analysis",
        "completeness": "analysis",
        "sweep_db": "warehouse",
        "export": "warehouse",
        "sweep_report": "analysis",
    }
    by_key = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    # Owners on every asset; a code version on the training asset; descriptions say
    # `<cell key>` in code spans (Markdown would swallow a bare <cell key> as a tag).
    assert all(n["owners"] for n in data["assetNodes"])
    assert by_key["training_run"]["opVersion"]
    assert "`data/runs/<cell key>/`" in by_key["training_run"]["description"]
    for n in data["assetNodes"]:
        outside_code = re.sub(r"`[^`]*`", "", n["description"])
        assert not re.search(r"<[A-Za-z][^>]*>", outside_code), n["description"]
    node = data["assetNodeOrError"]
    assert node["partitionStats"] == {"numMaterialized": 2, "numPartitions": 216, "numFailed": 0}
    dims = {d["name"]: d["partitionKeys"] for d in node["partitionKeysByDimension"]}
    assert dims["variant"] == ["adamw", "base", "bn_off", "narrow"] and len(dims["hp"]) == 54
