"""Signed heartbeats generated from ingest's OpenAPI document.

schemathesis on its own can only send ingest unsigned requests (tests/api/run
does: each must get the documented 401). Here schemathesis generates bodies
and headers from the document, and this driver signs each body the way any
collector must (PROTOCOL.md §1, written from the contract, not from the Rust
code), sends exactly the signed bytes, and has schemathesis check the answer
against the document: no 5xx, a documented status, a body of the documented
shape. Positive cases get a fresh `sent_at_ms` so that most are accepted and
the 202 is checked too; negative cases break the schema and must get a 4xx.

Needs ROLLCALL_API_INGEST (base URL, loopback) and ROLLCALL_API_FLEET_SECRET
(hex); tests/api/run sets both.
"""

import hashlib
import hmac
import itertools
import json
import os
import time
from urllib.parse import urlparse

import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

INGEST = os.environ.get("ROLLCALL_API_INGEST", "")
SECRET = bytes.fromhex(os.environ.get("ROLLCALL_API_FLEET_SECRET", ""))
KEY_ID = "k1"
assert urlparse(INGEST).hostname in ("127.0.0.1", "localhost"), f"loopback only, not {INGEST!r}"

schema = schemathesis.openapi.from_url(f"{INGEST}/openapi.json")
sequence = itertools.count()
answers = {}
# What is checked here is the answer to a correctly signed request. Missing,
# forged or malformed signing headers are the CLI run's part (tests/api/run),
# so the header checks, which would see this driver's real headers replace
# generated ones, are not run here; a body outside the schema must get a 4xx
# (asserted below).
ANSWER_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def agent_key(agent_id):
    return hmac.new(SECRET, b"rollcall-agent-key\n" + agent_id.encode(), hashlib.sha256).digest()


def signed_headers(agent_id, body):
    timestamp = str(int(time.time()))
    digest = hashlib.sha256(body).hexdigest()
    to_sign = "\n".join(["rollcall-v1", KEY_ID, agent_id, timestamp, digest]).encode()
    signature = hmac.new(agent_key(agent_id), to_sign, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-Rollcall-Agent": agent_id,
        "X-Rollcall-Key-Id": KEY_ID,
        "X-Rollcall-Timestamp": timestamp,
        "X-Rollcall-Signature": f"v1={signature}",
    }


def signer_for(case):
    """The agent id to sign as: the body's, when it is a header-safe string."""
    body = case.body
    agent_id = body.get("agent_id") if isinstance(body, dict) else None
    if isinstance(agent_id, str) and agent_id and agent_id.isascii() and agent_id.isprintable():
        return agent_id
    return "api-fuzz"


@schema.include(method="POST", path="/v1/heartbeats").parametrize()
@settings(max_examples=int(os.environ.get("ROLLCALL_API_EXAMPLES", "150")), deadline=None,
          suppress_health_check=list(HealthCheck))
def test_signed_heartbeats_get_documented_answers(case):
    negative = case.meta.is_negative_at(ParameterLocation.BODY)
    if not negative and isinstance(case.body, dict):
        # Newer than anything stored for this agent, and not in the future.
        case.body["sent_at_ms"] = int(time.time() * 1000) - 1000 + next(sequence) % 1000
    if case.body is NOT_SET:
        body = b""
    elif isinstance(case.body, bytes):
        body = case.body
    else:
        body = json.dumps(case.body).encode()
    agent_id = signer_for(case)
    # The method too: the coverage phase also tries undeclared ones (405).
    response = requests.request(case.method, f"{INGEST}/v1/heartbeats", data=body,
                                headers=signed_headers(agent_id, body), timeout=10)
    answers[response.status_code] = answers.get(response.status_code, 0) + 1
    case.validate_response(response, checks=ANSWER_CHECKS)
    if negative and case.method == "POST":
        assert 400 <= response.status_code < 500, (
            f"a body outside the schema was answered {response.status_code}: {response.text}")


def test_zz_the_signed_run_reached_acceptance():
    """The run above checked accepted heartbeats too, not only refusals."""
    print(f"signed heartbeats by answer: {dict(sorted(answers.items()))}")
    assert answers.get(202, 0) > 0, answers
    assert answers.get(400, 0) > 0, answers
