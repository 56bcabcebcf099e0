"""Share links (signed capabilities checked by the gateway), the explorer's cookie
rules, and Prometheus /metrics, against a real node running real jobs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crypto.keys import Identity
from node.api.share import (
    MAX_REVOKED,
    RevocationList,
    ShareRefused,
    Shares,
    decode,
    issue,
    parse_duration,
)
from node.dev.devstack import Devstack
from node.dev.models import build_mlp, make_inputs
from node.executor.tensors import encode_tensors
from protocol.errors import MeshrunError

CID = "bafybeidohtnvdh2h3y6fh6xtbupl6yvb3yokoijq2lnwku6r3y2z46xtnq"
OTHER = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"


# ----------------------------------------------------------------- no node needed


def test_a_share_opens_its_cid_and_paths_under_it_only(tmp_path: Path) -> None:
    shares = Shares(Identity.generate(), tmp_path)
    share, token = shares.issue(CID, "outputs", 60)
    assert shares.check(token, CID, "outputs") == share
    assert shares.check(token, CID, "outputs/y.npy").id == share.id
    for cid, path, why in (
        (OTHER, "outputs", "does not cover"),
        (CID, "", "does not cover"),
        (CID, "outputs2", "does not cover"),
        (CID, "outputs/../logs", "does not cover"),
    ):
        with pytest.raises(ShareRefused, match=why):
            shares.check(token, cid, path)


def test_forged_expired_and_revoked_shares_are_refused(tmp_path: Path) -> None:
    mine = Shares(Identity.generate(), tmp_path)
    _, foreign = issue(Identity.generate(), CID, "", 60)  # another node's key
    with pytest.raises(ShareRefused, match="not signed by this node"):
        mine.check(foreign, CID, "")
    _, token = mine.issue(CID, "", 60)
    head, _, sig = token.partition(".")
    claims = decode(token)[1].replace(CID.encode(), OTHER.encode())
    import base64

    altered = base64.urlsafe_b64encode(claims).rstrip(b"=").decode() + "." + sig
    with pytest.raises(ShareRefused, match="not signed by this node"):
        mine.check(altered, OTHER, "")
    with pytest.raises(ShareRefused, match="expired"):
        mine.check(token, CID, "", now=time.time() + 61)
    for junk in ("", "x", "a.b.c", "!!.!!", head + ".", "e30.AAAA"):
        with pytest.raises(ShareRefused):
            mine.check(junk, CID, "")
    assert mine.revoke(f"http://x/ipfs/{CID}/?share={token}")["revoked"]
    with pytest.raises(ShareRefused, match="revoked"):
        mine.check(token, CID, "")
    # Persisted: a restarted node still refuses it.
    with pytest.raises(ShareRefused, match="revoked"):
        Shares(mine.identity, tmp_path).check(token, CID, "")


def test_the_revocation_list_forgets_expired_links_and_is_bounded(tmp_path: Path) -> None:
    revoked = RevocationList(tmp_path)
    now = 1_000_000.0
    assert revoked.revoke("old-link-id", int(now) + 5, now=now)
    assert not revoked.revoke("old-link-id", int(now) + 5, now=now)
    assert revoked.revoke("new-link-id", int(now) + 100, now=now + 10)
    assert "old-link-id" not in revoked and len(revoked) == 1
    revoked._revoked = {f"id-{i:08d}": int(now) + 1000 for i in range(MAX_REVOKED)}
    with pytest.raises(MeshrunError):
        revoked.revoke("one-too-many", int(now) + 1000, now=now)


def test_parse_duration() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("90") == 90
    assert parse_duration("1.5h") == 5400
    for bad in ("", "soon", "0s", "400d", "-1d"):
        with pytest.raises(ValueError):
            parse_duration(bad)


# ------------------------------------------------------------------- a real node


def live(test: Any) -> Any:
    return pytest.mark.multiprocess(pytest.mark.slow(test))


@pytest.fixture(scope="module")
def stack(api_stack: Devstack) -> Devstack:
    return api_stack


def _base(node: Any) -> str:
    return str(node.rpc_url).removesuffix("/rpc")


def _auth(node: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {node.token}"}


@pytest.fixture(scope="module")
def done_job(stack: Devstack) -> dict[str, Any]:
    with stack.requester.client() as client:
        model = client.storage_add(build_mlp(seed=11))
        inputs = client.storage_add(encode_tensors(make_inputs(batch=2, seed=11)))
        job = client.call("job.submit", model_cid=model, inputs_cid=inputs)
        done = dict(client.wait_for_job(job["job_id"], timeout=60))
    assert done["status"] == "completed", done
    return done


def _scrape(node: Any) -> dict[str, float]:
    """Every sample as 'name{labels}' -> value, parsed by Prometheus' own parser."""
    text = httpx.get(_base(node) + "/metrics", headers=_auth(node), timeout=10).text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


@live
def test_metrics_move_with_a_real_job(stack: Devstack) -> None:
    requester, compute = stack.requester, stack.compute_nodes[0]
    assert httpx.get(_base(requester) + "/metrics", timeout=10).status_code == 401
    before_r, before_c = _scrape(requester), _scrape(compute)
    with requester.client() as client:
        model = client.storage_add(build_mlp(seed=12))
        inputs = client.storage_add(encode_tensors(make_inputs(batch=2, seed=12)))
        job = client.call("job.submit", model_cid=model, inputs_cid=inputs)
        during = _scrape(requester)  # mid-job: scraping must work while jobs move
        assert during["meshrun_peers_connected{}"] >= 1
        assert client.wait_for_job(job["job_id"], timeout=60)["status"] == "completed"
    after_r, after_c = _scrape(requester), _scrape(compute)

    def moved(before: dict[str, float], after: dict[str, float], key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    done = "role=requester,status=completed"
    assert moved(before_r, after_r, f"meshrun_jobs_finished_total{{{done}}}") == 1
    assert moved(before_r, after_r, f"meshrun_jobs{{{done}}}") == 1
    assert moved(before_r, after_r, "meshrun_bids_total{kind=bid,reason=}") >= 1
    assert moved(before_r, after_r, f"meshrun_job_execution_seconds_count{{{done}}}") == 1
    assert moved(before_r, after_r, "meshrun_job_events_total{role=requester,type=Completed}") == 1
    assert (
        moved(
            before_r,
            after_r,
            "meshrun_gossip_messages_total{outcome=accepted,topic=/meshrun/jobs/1}",
        )
        >= 0
    )
    cdone = "role=compute,status=completed"
    assert moved(before_c, after_c, f"meshrun_jobs_finished_total{{{cdone}}}") == 1
    assert moved(before_c, after_c, f"meshrun_job_execution_seconds_count{{{cdone}}}") == 1
    assert moved(before_c, after_c, "meshrun_fetch_seconds_count{source=job_inputs}") == 1
    assert after_c["meshrun_gossip_messages_total{outcome=accepted,topic=/meshrun/jobs/1}"] >= 1
    assert "meshrun_worker_restarts_total{}" in after_c
    # The requester served the job's model and inputs over the block exchange.
    served = "meshrun_blocks_served_bytes_total{via=exchange}"
    assert moved(before_r, after_r, served) > 0
    assert "meshrun_blocks_served_bytes_total{via=bitswap}" in after_r
    # Every compute node answers every job it hears: a bid or a reasoned refusal.
    sent = [k for k in after_c if k.startswith("meshrun_bids_sent_total{")]
    assert sum(moved(before_c, after_c, k) for k in sent) >= 1, sent


@live
def test_share_link_opens_without_a_token_and_carries_itself(
    stack: Devstack, done_job: dict[str, Any]
) -> None:
    requester = stack.requester
    with requester.client() as client:
        share = client.call("share.create", target=done_job["job_id"], expires_in=600)
        assert share["cid"] == done_job["result_cid"]
        with pytest.raises(MeshrunError):
            client.call("share.create", target="not-a-cid-nor-job")
    listing = httpx.get(share["url"], timeout=30)
    assert listing.status_code == 200, listing.text
    assert "output.json" in listing.text
    token = share["token"]
    assert f'href="output.json?share={token}"' in listing.text
    assert f'href="/ipfs/{done_job["result_cid"]}"' not in listing.text
    file = httpx.get(
        f"{_base(requester)}/ipfs/{share['cid']}/output.json", params={"share": token}, timeout=30
    )
    assert file.status_code == 200 and file.content.startswith(b"{")
    # Without the share (and without a token) it is the API's 401 as before.
    bare = httpx.get(f"{_base(requester)}/ipfs/{share['cid']}/output.json", timeout=30)
    assert bare.status_code == 401
    # Out of scope: another CID with this share.
    other = httpx.get(
        f"{_base(requester)}/ipfs/{done_job['model_cid']}", params={"share": token}, timeout=30
    )
    assert other.status_code == 403 and "does not cover" in other.text
    # Revoked: 403 with the reason.
    with requester.client() as client:
        assert client.call("share.revoke", share=share["url"])["revoked"]
    gone = httpx.get(share["url"], timeout=30)
    assert gone.status_code == 403 and "revoked" in gone.text
    assert gone.headers["content-type"].startswith("text/html")


@live
def test_the_session_cookie_never_opens_the_rpc(stack: Devstack) -> None:
    requester = stack.requester
    with requester.client() as client:
        link = client.call("explorer.login_link")["url"]
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        assert browser.get(_base(requester) + "/").url.path == "/login"
        page = browser.get(link)
        assert page.status_code == 200 and page.url.path == "/"
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert browser.get(link).status_code == 403  # one-time
        rpc = browser.post(
            _base(requester) + "/rpc", json={"jsonrpc": "2.0", "id": 1, "method": "node.info"}
        )
        assert rpc.status_code == 401
        # A POST without the CSRF token is refused even with the cookie.
        assert browser.post(_base(requester) + "/logout", data={}).status_code == 403
        assert browser.get(_base(requester) + "/v1/jobs").status_code == 200


def test_metrics_public_opens_metrics_only() -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    from node.api.auth import AuthMiddleware, Gate, RateLimiter

    async def ok(_: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    for open_paths, metrics_status in ((frozenset(), 401), (frozenset({"/metrics"}), 200)):
        app = Starlette()
        app.add_route("/metrics", ok)
        app.add_route("/rpc", ok, methods=["POST"])
        app.add_middleware(AuthMiddleware, gate=Gate("t0ken", RateLimiter(0), None, open_paths))
        with TestClient(app) as http:
            assert http.get("/metrics").status_code == metrics_status
            assert http.post("/rpc").status_code == 401
            assert (
                http.get("/metrics", headers={"Authorization": "Bearer t0ken"}).status_code == 200
            )
