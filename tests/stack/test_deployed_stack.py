"""The deployed shape, end to end, on the AWS emulator with IAM enforced.

Packages the x86_64 Lambda zips (scripts/package ran before this), uploads
them to the emulator's S3, deploys infra/template.yaml through its
CloudFormation with the SAM transform, and drives every route and client
through the function URLs the way users do: a real collector in `run` mode
for several history windows (no 5xx), its history read back, the `rollcall`
CLI and the fleet page (in Chromium) from the query URL, /metrics, `leaving`
taking the agent offline at once, and a fleet secret rotated in Secrets
Manager without a redeploy. It also checks TTL on the table, that no secret
is in the Lambda configuration, and that each function's role can do its own
job and nothing more.

Only the emulator's loopback endpoint is ever contacted: function URLs the
stack reports (https://<id>.lambda-url.<region>.on.aws/) are reached through
the emulator's path-based form on 127.0.0.1.
"""

import base64
import calendar
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import boto3
import botocore.exceptions
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# One-minute history windows: the running collector must deliver at least
# this many through the deployed stack.
HISTORY_WINDOWS = 3
# How stale a secret the functions may hold (the template's SecretMaxAgeSeconds).
SECRET_MAX_AGE_S = 5
ENDPOINT = os.environ.get("ROLLCALL_TEST_AWS_ENDPOINT", "http://127.0.0.1:4566")
RUN = f"{os.getpid()}-{int(time.time())}"


def loopback_only(url):
    host = urlparse(url).hostname or ""
    assert host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."), f"{url} is not a loopback address"
    return url


loopback_only(ENDPOINT)


def client(service, **credentials):
    return boto3.client(
        service,
        endpoint_url=ENDPOINT,
        region_name="us-east-1",
        aws_access_key_id=credentials.get("key", "test"),
        aws_secret_access_key=credentials.get("secret", "test"),
        aws_session_token=credentials.get("token"),
    )


def binary(name):
    for profile in ("release", "debug"):
        path = ROOT / "target" / profile / name
        if path.exists():
            return str(path)
    raise AssertionError(f"{name} is not built; run cargo build --workspace --bins")


def local_url(function_url):
    """https://<id>.lambda-url.<region>.on.aws/ -> the emulator's path-based form."""
    match = re.match(r"https?://([^.]+)\.lambda-url\.", function_url)
    assert match, f"unexpected function URL {function_url}"
    return loopback_only(f"{ENDPOINT}/_aws/lambda-url/{match.group(1)}")


def http(method, url, headers=None, body=None):
    request = urllib.request.Request(loopback_only(url), method=method, headers=headers or {}, data=body)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


class CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation's short-form tags (!Ref, !Sub, ...) as plain values."""


def _tagged(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_mapping(node)


CfnLoader.add_multi_constructor("!", _tagged)


@pytest.fixture(scope="module")
def stack():
    secrets = client("secretsmanager")
    fleet_secret = os.urandom(32).hex()
    token = os.urandom(24).hex()
    claim_token, lab_token = os.urandom(24).hex(), os.urandom(24).hex()
    names = {"fleet": f"rollcall-{RUN}/fleet-secrets", "tokens": f"rollcall-{RUN}/query-tokens",
             "webhook": f"rollcall-{RUN}/webhook-secret"}
    secrets.create_secret(Name=names["fleet"], SecretString=f"k1={fleet_secret}")
    # A v1 token (reads every pool), one that may claim, one limited to a pool
    # (PROTOCOL.md §4 "Scoped tokens"), in the form the README gives.
    secrets.create_secret(Name=names["tokens"],
                          SecretString=f"{token},{claim_token}:read+claim,{lab_token}:read+claim:lab-a")

    # A webhook receiver that checks signatures with the reference Standard
    # Webhooks package, and refuses its first two deliveries.
    webhook_secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    secrets.create_secret(Name=names["webhook"], SecretString=webhook_secret)
    webhook_log = ROOT / "target" / f"stack-webhooks-{RUN}.jsonl"
    receiver = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "stack" / "webhook_receiver.py"), str(webhook_log), "--fail-first", "2"],
        env={**os.environ, "ROLLCALL_WEBHOOK_SECRET": webhook_secret}, stdout=subprocess.PIPE, text=True)
    webhook_port = int(receiver.stdout.readline())

    s3 = client("s3")
    bucket = f"rollcall-artifacts-{RUN}"
    s3.create_bucket(Bucket=bucket)
    template = (ROOT / "infra" / "template.yaml").read_text()
    for function in ("ingest", "query", "fleet"):
        package = ROOT / "target" / "lambda" / f"{function}.zip"
        assert package.exists(), "run scripts/package first"
        s3.upload_file(str(package), bucket, f"{function}.zip")
        local = f"CodeUri: ../target/lambda/{function}.zip"
        assert local in template, f"template no longer has {local!r}"
        # What `sam package` does: point CodeUri at the uploaded artifact.
        template = template.replace(local, f"CodeUri: s3://{bucket}/{function}.zip")

    cloudformation = client("cloudformation")
    stack_name = f"rollcall-{RUN}"
    started = time.monotonic()
    cloudformation.create_stack(
        StackName=stack_name,
        TemplateBody=template,
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"],
        Parameters=[
            {"ParameterKey": "FleetSecretsSecretName", "ParameterValue": names["fleet"]},
            {"ParameterKey": "QueryTokensSecretName", "ParameterValue": names["tokens"]},
            {"ParameterKey": "SecretMaxAgeSeconds", "ParameterValue": str(SECRET_MAX_AGE_S)},
            {"ParameterKey": "WebhookUrls", "ParameterValue": f"http://127.0.0.1:{webhook_port}/hook"},
            {"ParameterKey": "WebhookSecretName", "ParameterValue": names["webhook"]},
        ],
    )
    while True:
        description = cloudformation.describe_stacks(StackName=stack_name)["Stacks"][0]
        status = description["StackStatus"]
        if not status.endswith("IN_PROGRESS"):
            break
        assert time.monotonic() - started < 120, "stack did not finish deploying in 120 s"
        time.sleep(0.2)
    deploy_s = time.monotonic() - started
    if status != "CREATE_COMPLETE":
        events = cloudformation.describe_stack_events(StackName=stack_name)["StackEvents"]
        reasons = [f"{e['LogicalResourceId']}: {e.get('ResourceStatusReason')}" for e in events if "FAILED" in e["ResourceStatus"]]
        pytest.fail(f"stack {status}: {reasons}")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in description["Outputs"]}
    print(f"\ndeployed {stack_name} on the emulator in {deploy_s:.2f} s; outputs {outputs}")
    resources = {
        r["LogicalResourceId"]: r["PhysicalResourceId"]
        for r in cloudformation.describe_stack_resources(StackName=stack_name)["StackResources"]
    }
    deployed = {
        "ingest": local_url(outputs["IngestUrl"]),
        "query": local_url(outputs["QueryUrl"]),
        "table": outputs["TableName"],
        "fleet_table": outputs["FleetTableName"],
        "secret": fleet_secret,
        "token": token,
        "claim_token": claim_token,
        "lab_token": lab_token,
        "resources": resources,
        "deploy_s": deploy_s,
        "names": names,
        "webhook_log": webhook_log,
    }
    # A collector as users run it, for the whole module: short interval,
    # one-minute history windows, its log kept for the 5xx check.
    log_path = ROOT / "target" / f"stack-collector-{RUN}.log"
    log = open(log_path, "w")
    runner = subprocess.Popen(
        [binary("rollcall-collector"), "run", "--interval", "5", "--history-window", "1"],
        env={**collector_env(deployed, "stack-runner"), "RUST_LOG": "debug"},
        stdout=log, stderr=subprocess.STDOUT,
    )
    deployed.update(runner=runner, runner_log=log_path, runner_started=time.monotonic())
    time.sleep(1)
    assert runner.poll() is None, f"the collector exited at start: {log_path.read_text()[-2000:]}"
    try:
        yield deployed
    finally:
        if runner.poll() is None:
            runner.kill()
        receiver.kill()
        log.close()
        cloudformation.delete_stack(StackName=stack_name)


def agent_key_for(fleet_secret, agent_id):
    return subprocess.run(
        [binary("rollcall-collector"), "keygen", "--agent-id", agent_id],
        env={**os.environ, "ROLLCALL_FLEET_SECRET": fleet_secret},
        capture_output=True, text=True, check=True,
    ).stdout.strip()


def collector_env(stack, agent_id, agent_key=None, key_id="k1"):
    env = {
        **os.environ,
        "ROLLCALL_ENDPOINT": stack["ingest"],
        "ROLLCALL_KEY_ID": key_id,
        "ROLLCALL_AGENT_KEY": agent_key or agent_key_for(stack["secret"], agent_id),
        "ROLLCALL_AGENT_ID": agent_id,
        "ROLLCALL_CONFIG": "/dev/null",
        "ROLLCALL_STATE_DIR": f"/tmp/rollcall-stack-test-{RUN}-{agent_id}",
    }
    env.pop("ROLLCALL_FAKE_GPUS", None)
    return env


def collector(stack, agent_id, *args, agent_key=None, key_id="k1"):
    env = collector_env(stack, agent_id, agent_key, key_id)
    return subprocess.run([binary("rollcall-collector"), *args], env=env, capture_output=True, text=True, timeout=60)


def wait_for(what, check, limit_s):
    """Polls `check` until it returns something truthy; fails after limit_s."""
    deadline = time.monotonic() + limit_s
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {limit_s} s"
        time.sleep(1)


def post_signed(stack, body):
    """Posts a heartbeat signed here as a collector signs it (PROTOCOL.md §1)."""
    agent_id = body["agent_id"]
    raw = json.dumps(body).encode()
    key = hmac.new(bytes.fromhex(stack["secret"]), b"rollcall-agent-key\n" + agent_id.encode(), hashlib.sha256).digest()
    timestamp = str(int(time.time()))
    to_sign = "\n".join(["rollcall-v1", "k1", agent_id, timestamp, hashlib.sha256(raw).hexdigest()]).encode()
    headers = {"Content-Type": "application/json", "X-Rollcall-Agent": agent_id, "X-Rollcall-Key-Id": "k1",
               "X-Rollcall-Timestamp": timestamp,
               "X-Rollcall-Signature": "v1=" + hmac.new(key, to_sign, hashlib.sha256).hexdigest()}
    request = urllib.request.Request(loopback_only(f"{stack['ingest']}/v1/heartbeats"), data=raw, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202
        return json.loads(response.read())


def gpu_host(agent_id, pool, free_mb):
    return {
        "v": 1, "agent_id": agent_id, "sent_at_ms": int(time.time() * 1000), "interval_s": 30, "pool": pool,
        "cpu": {"cores_physical": 8, "cores_logical": 16, "cores_available": 12, "load_1m": 1.0, "load_5m": 1.0, "load_15m": 1.0},
        "memory": {"total_mb": 64000, "available_mb": 32000},
        "gpus": [{"index": i, "vendor": "nvidia", "name": "NVIDIA H100", "uuid": f"GPU-{agent_id}-{i}",
                  "memory_total_mb": 81920, "memory_free_mb": free} for i, free in enumerate(free_mb)],
    }


def test_template_declares_what_the_emulator_may_ignore():
    template = yaml.load((ROOT / "infra" / "template.yaml").read_text(), Loader=CfnLoader)
    table = template["Resources"]["AgentsTable"]["Properties"]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    # The AWS-owned key unless the operator names a KMS key: no KMS charges by default.
    assert table["SSESpecification"][0] == "CustomerKey"
    assert template["Parameters"]["KmsKeyArn"]["Default"] == ""
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    # One architecture story: the default is what scripts/package builds.
    assert template["Parameters"]["Architecture"]["Default"] == "x86_64"
    assert template["Globals"]["Function"]["LoggingConfig"]["LogFormat"] == "JSON"
    for name, variable in (("IngestFunction", "ROLLCALL_FLEET_SECRETS"), ("QueryFunction", "ROLLCALL_QUERY_TOKENS")):
        function = template["Resources"][name]["Properties"]
        assert function["FunctionUrlConfig"]["AuthType"] == "NONE"
        assert "ReservedConcurrentExecutions" in function, name
        variables = function["Environment"]["Variables"]
        # The secret's name is configured, never its value.
        assert variable not in variables and f"{variable}_SECRET_ID" in variables, name
        assert "resolve:secretsmanager" not in json.dumps(variables), name
    # State changes: the events table expires what is 30 days old, and the
    # fleet function sweeps for deadlines every minute.
    assert template["Resources"]["EventsTable"]["Properties"]["TimeToLiveSpecification"] == {
        "AttributeName": "expires_at", "Enabled": True}
    sweep = template["Resources"]["FleetFunction"]["Properties"]["Events"]["DeadlineSweep"]
    assert sweep == {"Type": "Schedule", "Properties": {"Schedule": "rate(1 minute)"}}
    # No secret in any parameter default.
    for name, parameter in template["Parameters"].items():
        assert not re.fullmatch(r"[0-9a-f]{32,}", str(parameter.get("Default", ""))), name


def test_table_ttl_is_enabled(stack):
    dynamodb = client("dynamodb")
    ttl = dynamodb.describe_time_to_live(TableName=stack["table"])["TimeToLiveDescription"]
    if ttl.get("TimeToLiveStatus") != "ENABLED":
        # The emulator's CloudFormation drops TimeToLiveSpecification; the
        # template declares it (previous test), so turn it on as AWS would have.
        print(f"emulator ignored the template's TimeToLiveSpecification (status {ttl.get('TimeToLiveStatus')}); enabling it")
        dynamodb.update_time_to_live(TableName=stack["table"], TimeToLiveSpecification={"AttributeName": "expires_at", "Enabled": True})
        ttl = dynamodb.describe_time_to_live(TableName=stack["table"])["TimeToLiveDescription"]
    assert ttl["TimeToLiveStatus"] == "ENABLED"
    assert ttl["AttributeName"] == "expires_at"


def test_health_checks_answer_without_credentials(stack):
    for url in (stack["ingest"], stack["query"]):
        assert http("GET", f"{url}/healthz") == (200, {"ok": True})


def test_each_function_serves_its_openapi_document_without_credentials(stack):
    for url, kept in ((stack["ingest"], "ingest-fn/openapi.json"), (stack["query"], "query-fn/openapi.json")):
        status, document = http("GET", f"{url}/openapi.json")
        assert status == 200, document
        assert document == json.loads((ROOT / kept).read_text()), f"{url}/openapi.json is not {kept}"
        assert document["openapi"] == "3.1.0"


def test_a_real_collector_reports_through_the_deployed_stack(stack):
    result = collector(stack, "stack-agent", "once", "--skip-cpu-usage", "--verbose")
    assert result.returncode == 0, result.stderr
    assert "heartbeat accepted: agent stack-agent" in result.stdout

    printed = json.loads(collector(stack, "stack-agent", "print", "--skip-cpu-usage").stdout)
    auth = {"Authorization": f"Bearer {stack['token']}"}
    status, agent = http("GET", f"{stack['query']}/v1/agents/stack-agent", auth)
    assert status == 200, agent
    assert agent["status"] == "online"
    assert agent["cpu_cores_physical"] == printed["cpu"]["cores_physical"]
    assert abs(agent["memory_total_gb"] - printed["memory"]["total_mb"] / 1024) < 0.01

    status, listing = http("GET", f"{stack['query']}/v1/agents?status=all", auth)
    assert status == 200
    assert "stack-agent" in [a["agent_id"] for a in listing["agents"]]


def test_forged_heartbeats_and_missing_tokens_are_refused(stack):
    forged = collector(stack, "stack-agent", "once", "--skip-cpu-usage", agent_key="ab" * 32)
    assert forged.returncode != 0
    assert "ingest answered 401: signature does not match" in forged.stderr, forged.stderr
    status, body = http("GET", f"{stack['query']}/v1/agents")
    assert status == 401 and "Bearer" in body["error"]
    status, body = http("GET", f"{stack['query']}/v1/agents?limit=0", {"Authorization": f"Bearer {stack['token']}"})
    assert status == 400 and body["error"].startswith("parameter limit")


def role_client(stack, logical_role):
    """DynamoDB as the given function's execution role."""
    role_name = stack["resources"][logical_role]
    role_arn = client("iam").get_role(RoleName=role_name)["Role"]["Arn"]
    credentials = client("sts").assume_role(RoleArn=role_arn, RoleSessionName="least-privilege-test")["Credentials"]
    return client("dynamodb", key=credentials["AccessKeyId"], secret=credentials["SecretAccessKey"], token=credentials["SessionToken"])


def emulator_enforces_iam():
    try:
        with urllib.request.urlopen(f"{ENDPOINT}/_ministack/health", timeout=5) as response:
            return json.loads(response.read()).get("auth") == "enabled"
    except (urllib.error.URLError, ValueError):
        return False


def test_each_function_role_can_do_its_job_and_nothing_more(stack):
    assert emulator_enforces_iam(), "the emulator must enforce IAM (scripts/test starts it with AUTH=true)"
    key = {"agent_id": {"S": "privilege-probe"}}
    item = {**key, "sent": {"N": "1"}}
    query_role = role_client(stack, "QueryFunctionRole")
    query_role.get_item(TableName=stack["table"], Key=key)
    with pytest.raises(botocore.exceptions.ClientError) as denied:
        query_role.put_item(TableName=stack["table"], Item=item)
    assert denied.value.response["Error"]["Code"] in ("AccessDeniedException", "AccessDenied")

    ingest_role = role_client(stack, "IngestFunctionRole")
    ingest_role.put_item(TableName=stack["table"], Item=item)
    update = dict(TableName=stack["table"], Key=key, UpdateExpression="SET #sent = :sent",
                  ExpressionAttributeNames={"#sent": "sent"}, ExpressionAttributeValues={":sent": {"N": "2"}})
    ingest_role.update_item(**update)
    # The query function moves agents found past their deadline out of the
    # online part of the index: an update, never a put or a delete.
    query_role.update_item(**update)
    index_query = dict(TableName=stack["table"], IndexName="by_vram_rank", KeyConditionExpression="#shard = :s",
                       ExpressionAttributeNames={"#shard": "shard"}, ExpressionAttributeValues={":s": {"S": "0"}})
    query_role.query(**index_query)
    for forbidden in (lambda: ingest_role.get_item(TableName=stack["table"], Key=key),
                      lambda: ingest_role.query(**index_query),
                      lambda: query_role.delete_item(TableName=stack["table"], Key=key),
                      lambda: ingest_role.delete_item(TableName=stack["table"], Key=key),
                      lambda: ingest_role.scan(TableName=stack["table"])):
        with pytest.raises(botocore.exceptions.ClientError) as denied:
            forbidden()
        assert denied.value.response["Error"]["Code"] in ("AccessDeniedException", "AccessDenied")
    client("dynamodb").delete_item(TableName=stack["table"], Key=key)


def test_the_fleet_role_adds_to_the_sums_and_touches_nothing_else(stack):
    assert emulator_enforces_iam(), "the emulator must enforce IAM (scripts/test starts it with AUTH=true)"
    bucket = {"part": {"S": "online"}, "bucket": {"S": "000000000001#privilege-probe"}}
    add = dict(TableName=stack["fleet_table"], Key=bucket, UpdateExpression="ADD #n :one",
               ExpressionAttributeNames={"#n": "n"}, ExpressionAttributeValues={":one": {"N": "1"}})
    fleet_role = role_client(stack, "FleetFunctionRole")
    fleet_role.transact_write_items(TransactItems=[{"Update": add}])
    sums_query = dict(TableName=stack["fleet_table"], KeyConditionExpression="#p = :p",
                      ExpressionAttributeNames={"#p": "part"}, ExpressionAttributeValues={":p": {"S": "online"}})
    query_role = role_client(stack, "QueryFunctionRole")
    query_role.query(**sums_query)
    agent = {"agent_id": {"S": "privilege-probe"}}
    for forbidden in (lambda: fleet_role.query(**sums_query),
                      lambda: fleet_role.put_item(TableName=stack["table"], Item=agent),
                      lambda: fleet_role.delete_item(TableName=stack["table"], Key=agent),
                      lambda: fleet_role.scan(TableName=stack["table"]),
                      lambda: fleet_role.delete_item(TableName=stack["fleet_table"], Key=bucket),
                      lambda: query_role.update_item(**add),
                      lambda: role_client(stack, "IngestFunctionRole").update_item(**add)):
        with pytest.raises(botocore.exceptions.ClientError) as denied:
            forbidden()
        assert denied.value.response["Error"]["Code"] in ("AccessDeniedException", "AccessDenied")
    client("dynamodb").delete_item(TableName=stack["fleet_table"], Key=bucket)


def test_metrics_parse_as_openmetrics(stack):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    collector(stack, "metrics-agent", "once", "--skip-cpu-usage")
    def scrape(query=""):
        request = urllib.request.Request(loopback_only(f"{stack['query']}/metrics{query}"),
                                         headers={"Authorization": f"Bearer {stack['token']}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            text = response.read().decode()
        return {family.name: family for family in text_string_to_metric_families(text)}

    # A plain scrape: fleet aggregates only, whatever the fleet size.
    fleet = scrape()
    assert "rollcall_agents" in fleet and "rollcall_pool_cores_available" in fleet, sorted(fleet)
    assert "rollcall_agent_online" not in fleet, "per-agent series without a selection"
    # The sums come from the fleet function, a stream batch behind ingest.
    def online_default():
        samples = scrape()["rollcall_agents"].samples
        return [s.value for s in samples if s.labels == {"status": "online", "pool": "default"} and s.value >= 1]
    wait_for("the fleet function to count the agent", online_default, 60)
    # A selection adds per-agent series.
    families = scrape("?status=all&limit=1000")
    for name in ("rollcall_agent_online", "rollcall_agent_cores_available",
                 "rollcall_agent_memory_available_bytes", "rollcall_agent_since_heartbeat_seconds"):
        assert name in families, sorted(families)
    online = {s.labels["agent_id"]: s.value for s in families["rollcall_agent_online"].samples}
    assert online["metrics-agent"] == 1


def test_the_fleet_sums_agree_with_the_agents_listed(stack):
    """A plain scrape reads the fleet function's sums, never the agents;
    once the stream has caught up they equal what the API lists."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    # Two GPUs, so that the GPU sums are checked against something: a
    # heartbeat signed here as a collector signs it (PROTOCOL.md §1).
    post_signed(stack, gpu_host("sums-agent", "default", (20110, 4096)))
    auth = {"Authorization": f"Bearer {stack['token']}"}

    def listed():
        agents, cursor = [], None
        while True:
            path = "/v1/agents?status=all&include_draining=true&limit=500" + (f"&cursor={cursor}" if cursor else "")
            status, page = http("GET", f"{stack['query']}{path}", auth)
            assert status == 200, page
            agents += page["agents"]
            cursor = page.get("next_cursor")
            if not cursor:
                return agents

    def agree():
        agents = listed()
        request = urllib.request.Request(loopback_only(f"{stack['query']}/metrics"), headers=auth)
        with urllib.request.urlopen(request, timeout=30) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
        summed = {(s.labels["status"], s.labels["pool"]): s.value for s in families["rollcall_agents"].samples}
        gpus = {s.labels["pool"]: s.value for s in families["rollcall_pool_gpus"].samples}
        free_mb = sum(s.value for s in families["rollcall_pool_gpu_memory_free_bytes"].samples) / 2**20
        expected = {}
        for agent in agents:
            key = (agent["status"], agent["pool"])
            expected[key] = expected.get(key, 0) + 1
        want_gpus = {}
        for agent in agents:
            if agent["status"] == "online":
                want_gpus[agent["pool"]] = want_gpus.get(agent["pool"], 0) + len(agent["gpus"])
        want_free_mb = sum(gpu["memory_free_gb"] * 1024 for agent in agents if agent["status"] == "online" for gpu in agent["gpus"])
        counted = {key: value for key, value in summed.items() if value}
        print(f"listed {expected}, summed {counted}; gpus listed {want_gpus}, summed {gpus}; free MiB {want_free_mb} / {free_mb}")
        # The record shows GB to two places: within 6 MiB a GPU.
        n_gpus = sum(want_gpus.values())
        return (counted == expected and abs(free_mb - want_free_mb) <= 6 * n_gpus
                and {p: g for p, g in gpus.items() if g} == {p: g for p, g in want_gpus.items() if g})

    wait_for("the fleet sums to agree with the listing", agree, 90)
    rows = client("dynamodb").query(TableName=stack["fleet_table"], KeyConditionExpression="#p = :p",
                                    ExpressionAttributeNames={"#p": "part"},
                                    ExpressionAttributeValues={":p": {"S": "record"}})["Items"]
    assert rows, "the sums live in the fleet table"


def test_no_secret_is_in_the_lambda_configuration(stack):
    lam = client("lambda")
    for logical in ("IngestFunction", "QueryFunction"):
        configuration = lam.get_function_configuration(FunctionName=stack["resources"][logical])
        text = json.dumps(configuration)
        assert stack["secret"] not in text and stack["token"] not in text, logical
        variables = configuration["Environment"]["Variables"]
        assert any(name.endswith("_SECRET_ID") for name in variables), variables


def test_an_agent_past_its_deadline_leaves_the_online_index_when_a_query_finds_it(stack):
    """Through the deployed query function: the first query that reads an
    agent past its deadline moves its index entry to the offline part, so
    later online queries never read it again."""
    sent = collector(stack, "deadline-agent", "once", "--skip-cpu-usage", "--interval", "5")
    assert sent.returncode == 0, sent.stderr
    key = {"agent_id": {"S": "deadline-agent"}}
    shard = lambda: client("dynamodb").get_item(TableName=stack["table"], Key=key, ConsistentRead=True)["Item"]["shard"]["S"]
    assert not shard().startswith("off")
    auth = {"Authorization": f"Bearer {stack['token']}"}
    status, agent = http("GET", f"{stack['query']}/v1/agents/deadline-agent", auth)
    deadline = time.strptime(agent["online_until"][:19], "%Y-%m-%dT%H:%M:%S")
    time.sleep(max(0.0, calendar.timegm(deadline) + 1.5 - time.time()))

    def moved():
        status, page = http("GET", f"{stack['query']}/v1/agents?limit=1000", auth)
        assert status == 200, page
        assert "deadline-agent" not in [a["agent_id"] for a in page["agents"]]
        return shard().startswith("off")
    wait_for("the query function to move the dead agent", moved, 20)
    status, page = http("GET", f"{stack['query']}/v1/agents?status=offline&limit=1000", auth)
    assert "deadline-agent" in [a["agent_id"] for a in page["agents"]], page


def test_the_index_shards_follow_the_declared_fleet_size(stack):
    """IndexShards=0 (the default) derives the shards from FleetSize, and
    every function that reads or writes the index gets the same count."""
    lam = client("lambda")
    for logical in ("IngestFunction", "QueryFunction"):
        variables = lam.get_function_configuration(FunctionName=stack["resources"][logical])["Environment"]["Variables"]
        assert variables["ROLLCALL_DYNAMODB_SHARDS"] == "8", (logical, variables)
    template = yaml.load((ROOT / "infra" / "template.yaml").read_text(), Loader=CfnLoader)
    shards = {size: row["Shards"] for size, row in template["Mappings"]["FleetShards"].items()}
    assert shards == {"10000": "8", "100000": "8", "1000000": "16"}
    assert set(shards) == set(map(str, template["Parameters"]["FleetSize"]["AllowedValues"]))


def test_the_cli_lists_the_agent_from_the_deployed_url(stack):
    wait_for("the running collector reports", lambda: http(
        "GET", f"{stack['query']}/v1/agents/stack-runner", {"Authorization": f"Bearer {stack['token']}"})[0] == 200, 30)
    result = subprocess.run(
        [binary("rollcall"), "agents", "--status", "all", "--json"],
        env={**os.environ, "ROLLCALL_URL": stack["query"], "ROLLCALL_TOKEN": stack["token"],
             "ROLLCALL_CLI_CONFIG": "/dev/null"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    listed = [agent["agent_id"] for agent in json.loads(result.stdout)]
    assert "stack-runner" in listed, listed
    table = subprocess.run(
        [binary("rollcall"), "agent", "stack-runner"],
        env={**os.environ, "ROLLCALL_URL": stack["query"], "ROLLCALL_TOKEN": stack["token"],
             "ROLLCALL_CLI_CONFIG": "/dev/null"},
        capture_output=True, text=True, timeout=60,
    )
    assert table.returncode == 0 and "stack-runner" in table.stdout, table.stderr


def test_rollcall_wait_returns_once_the_agent_is_there(stack):
    result = subprocess.run(
        [binary("rollcall"), "wait", "--status", "all", "--timeout", "60s", "--every", "2", "--json"],
        env={**os.environ, "ROLLCALL_URL": stack["query"], "ROLLCALL_TOKEN": stack["token"],
             "ROLLCALL_CLI_CONFIG": "/dev/null"},
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert "stack-runner" in [agent["agent_id"] for agent in json.loads(result.stdout)]


def test_the_record_carries_the_collectors_own_cost(stack):
    status, agent = http("GET", f"{stack['query']}/v1/agents/stack-runner", {"Authorization": f"Bearer {stack['token']}"})
    assert status == 200, agent
    assert 0 < agent["collector_rss_mb"] < 1024 and agent["collector_cpu_s"] >= 0, agent


def test_cursors_page_and_are_bound_to_their_filters(stack):
    for agent_id in ("page-a", "page-b"):
        assert collector(stack, agent_id, "once", "--skip-cpu-usage").returncode == 0
    auth = {"Authorization": f"Bearer {stack['token']}"}
    status, first = http("GET", f"{stack['query']}/v1/agents?status=all&limit=1", auth)
    assert status == 200 and len(first["agents"]) == 1 and first["next_cursor"], first
    cursor = first["next_cursor"]
    status, second = http("GET", f"{stack['query']}/v1/agents?status=all&limit=1&cursor={cursor}", auth)
    assert status == 200 and second["agents"][0]["agent_id"] != first["agents"][0]["agent_id"], second
    status, replayed = http("GET", f"{stack['query']}/v1/agents?status=offline&limit=1&cursor={cursor}", auth)
    assert status == 400 and replayed["error"].startswith("parameter cursor"), replayed


def test_answers_forbid_sniffing_and_caching_and_the_page_runs_only_its_own_script(stack):
    for url, headers in ((f"{stack['ingest']}/healthz", {}), (f"{stack['query']}/v1/agents", {}),
                         (f"{stack['query']}/", {})):
        request = urllib.request.Request(loopback_only(url), headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError as error:
            response = error
        assert response.headers["X-Content-Type-Options"] == "nosniff", url
        assert response.headers["Cache-Control"] == "no-store", url
    policy = urllib.request.urlopen(loopback_only(f"{stack['query']}/"), timeout=30).headers["Content-Security-Policy"]
    script_src = next(d.strip() for d in policy.split(";") if d.strip().startswith("script-src"))
    assert script_src.startswith("script-src 'sha256-") and "unsafe-inline" not in script_src, policy


def test_the_fleet_page_loads_from_the_deployed_url(stack):
    browser = ROOT / "tests" / "browser"
    assert (browser / "node_modules" / "playwright-core").exists(), "scripts/test installs playwright-core"
    screenshot = ROOT / "target" / "test-output" / "deployed-fleet-page.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["node", str(browser / "deployed_page.mjs"), stack["query"], stack["token"], str(screenshot)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert "stack-runner" in [row["agent"] for row in seen["rows"]], seen
    assert seen["outside"] == [], seen
    assert seen["failed"] == [], seen


def test_the_running_collector_delivers_history_without_a_5xx(stack):
    auth = {"Authorization": f"Bearer {stack['token']}"}

    def minutes():
        status, body = http("GET", f"{stack['query']}/v1/agents/stack-runner/history?minutes=15", auth)
        assert status == 200, body
        return len(body["minutes"]) >= HISTORY_WINDOWS and body["minutes"]

    # Window N closes at the (N+1)th minute boundary after the start, and goes
    # out with the next heartbeat.
    elapsed = time.monotonic() - stack["runner_started"]
    delivered = wait_for("history windows through the deployed stack", minutes, (HISTORY_WINDOWS + 1.5) * 60 - elapsed)
    for rollup in delivered:
        assert rollup["load_1m"]["min"] <= rollup["load_1m"]["max"]
    assert stack["runner"].poll() is None, "the collector stopped"
    log = stack["runner_log"].read_text()
    assert "heartbeat accepted" in log
    assert not re.search(r"answered 5\d\d", log), log[-3000:]


def test_a_draining_agent_is_listed_only_when_asked(stack):
    auth = {"Authorization": f"Bearer {stack['token']}"}
    assert collector(stack, "drained-agent", "drain").returncode == 0
    result = collector(stack, "drained-agent", "once", "--skip-cpu-usage")
    assert result.returncode == 0, result.stderr
    status, agent = http("GET", f"{stack['query']}/v1/agents/drained-agent", auth)
    assert status == 200 and agent["status"] == "online" and agent["state"] == "draining", agent

    def listed(query):
        status, body = http("GET", f"{stack['query']}/v1/agents?{query}", auth)
        assert status == 200, body
        return "drained-agent" in [a["agent_id"] for a in body["agents"]]

    assert not listed("status=all")
    assert listed("status=all&include_draining=true")


def test_leaving_takes_the_agent_offline_at_once(stack):
    runner = stack["runner"]
    runner.send_signal(15)
    assert runner.wait(timeout=30) == 0
    assert "sent the leaving heartbeat" in stack["runner_log"].read_text()
    status, agent = http("GET", f"{stack['query']}/v1/agents/stack-runner", {"Authorization": f"Bearer {stack['token']}"})
    assert status == 200 and agent["status"] == "offline", agent


def test_racing_claimers_through_the_deployed_stack_never_share_a_gpu(stack):
    """32 schedulers claim at once through the function URL against exactly
    7 unclaimed matching GPUs (PROTOCOL.md §4 "Claims"): 7 claims, no GPU
    twice, 25 no_capacity."""
    from concurrent.futures import ThreadPoolExecutor

    post_signed(stack, gpu_host("race-1", "race", (40_000,) * 4))
    post_signed(stack, gpu_host("race-2", "race", (40_000, 40_000, 2_000, 2_000)))
    post_signed(stack, gpu_host("race-3", "race", (40_000, 40_000)))
    claim_auth = {"Authorization": f"Bearer {stack['claim_token']}", "Content-Type": "application/json"}
    held = json.dumps({"agent_id": "race-3", "gpus": [1], "ttl_s": 600, "holder": "already"}).encode()
    status, body = http("POST", f"{stack['query']}/v1/claims", claim_auth, held)
    assert status == 201, body

    wanted = json.dumps({"pool": "race", "min_gpu_vram_gb": 30, "ttl_s": 600, "holder": "racer"}).encode()
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda _: http("POST", f"{stack['query']}/v1/claims", claim_auth, wanted), range(32)))
    made = [body for status, body in answers if status == 201]
    refused = [body["code"] for status, body in answers if status == 409]
    gpus = [(claim["agent_id"], gpu["index"]) for claim in made for gpu in claim["gpus"]]
    print(f"claims {len(made)}, refused {len(refused)}, statuses {sorted(status for status, _ in answers)}")
    assert len(made) + len(refused) == 32, answers
    assert len(gpus) == len(set(gpus)) == 7, gpus
    assert set(refused) == {"no_capacity"}, refused
    assert ("race-3", 1) not in gpus and not any(agent == "race-2" and index >= 2 for agent, index in gpus)
    # The listing agrees: nothing in the pool has a GPU with 30 GB free left.
    read = {"Authorization": f"Bearer {stack['token']}"}
    status, page = http("GET", f"{stack['query']}/v1/agents?pool=race&min_gpu_vram_gb=30", read)
    assert status == 200 and page["agents"] == [], page


def test_scoped_tokens_and_claims_through_the_deployed_stack(stack):
    """Scopes and pools from the tokens secret; a claim read, extended and
    released through the function URL."""
    post_signed(stack, gpu_host("scope-lab", "lab-a", (30_000,)))
    post_signed(stack, gpu_host("scope-farm", "render", (80_000,)))
    read = {"Authorization": f"Bearer {stack['token']}", "Content-Type": "application/json"}
    lab = {"Authorization": f"Bearer {stack['lab_token']}", "Content-Type": "application/json"}
    claim = {"Authorization": f"Bearer {stack['claim_token']}", "Content-Type": "application/json"}
    by_name = json.dumps({"agent_id": "scope-farm", "gpus": [0], "ttl_s": 300, "holder": "job-1"}).encode()
    status, body = http("POST", f"{stack['query']}/v1/claims", read, by_name)
    assert (status, body["code"]) == (403, "forbidden"), body
    status, body = http("POST", f"{stack['query']}/v1/claims", lab, by_name)
    assert status == 404, body

    status, page = http("GET", f"{stack['query']}/v1/agents?status=all", lab)
    assert status == 200 and {a["pool"] for a in page["agents"]} == {"lab-a"}, page
    assert http("GET", f"{stack['query']}/v1/agents/scope-farm", lab)[0] == 404

    status, made = http("POST", f"{stack['query']}/v1/claims", claim, by_name)
    assert status == 201, made
    assert made["cuda_visible_devices"] == "GPU-scope-farm-0"
    path = f"{stack['query']}/v1/claims/{made['claim_id']}"
    assert http("GET", path, lab)[0] == 404, "another pool's claim does not exist for it"
    status, shown = http("GET", f"{stack['query']}/v1/agents/scope-farm", read)
    assert shown["gpus"][0]["claim"]["holder"] == "job-1", shown
    status, extended = http("PUT", path, claim, json.dumps({"ttl_s": 3600}).encode())
    assert status == 200 and extended["expires_at"] > made["expires_at"], extended
    request = urllib.request.Request(loopback_only(path), method="DELETE", headers=claim)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 204
    assert http("GET", path, read)[0] == 404
    status, shown = http("GET", f"{stack['query']}/v1/agents/scope-farm", read)
    assert shown["gpus"][0]["claim"] is None, shown


def test_gpu_processes_through_the_deployed_stack(stack):
    """PROTOCOL.md §4 "GPU processes": a heartbeat's processes are stored
    apart from the record and shown on the record by id, not in lists."""
    body = gpu_host("procs-agent", "procs", (40_000, 80_000))
    body["gpus"][0]["processes"] = [
        {"pid": 4242, "used_mb": 38_000, "name": "python3", "user": "alice"},
        {"pid": 77, "used_mb": 900},
    ]
    body["gpus"][1]["processes"] = []
    post_signed(stack, body)
    auth = {"Authorization": f"Bearer {stack['token']}"}
    status, record = http("GET", f"{stack['query']}/v1/agents/procs-agent", auth)
    assert status == 200, record
    assert record["gpus"][0]["processes"] == body["gpus"][0]["processes"], record
    assert record["gpus"][1]["processes"] == [], record
    status, page = http("GET", f"{stack['query']}/v1/agents?status=all&limit=1000", auth)
    listed = [agent for agent in page["agents"] if agent["agent_id"] == "procs-agent"]
    assert listed and "processes" not in listed[0]["gpus"][0], listed
    # A later heartbeat that leaves them out (unchanged) keeps them.
    body["sent_at_ms"] += 1000
    for gpu in body["gpus"]:
        del gpu["processes"]
    post_signed(stack, body)
    status, record = http("GET", f"{stack['query']}/v1/agents/procs-agent", auth)
    assert record["gpus"][0]["processes"][0]["name"] == "python3", record
    # A /metrics selection shows the memory by process name, and which GPU a claim holds.
    claim = {"Authorization": f"Bearer {stack['claim_token']}", "Content-Type": "application/json"}
    held = json.dumps({"agent_id": "procs-agent", "gpus": [1], "ttl_s": 300, "holder": "job"}).encode()
    assert http("POST", f"{stack['query']}/v1/claims", claim, held)[0] == 201
    request = urllib.request.Request(loopback_only(f"{stack['query']}/metrics?pool=procs&status=all"), headers=auth)
    with urllib.request.urlopen(request, timeout=30) as response:
        lines = response.read().decode().splitlines()
    assert f'rollcall_gpu_process_memory_used_bytes{{agent_id="procs-agent",gpu="0",process="python3"}} {38_000 * 2**20}.0' in lines, lines
    assert 'rollcall_gpu_claimed{agent_id="procs-agent",gpu="1",vendor="nvidia"} 1' in lines, lines


# Last, because it retires key id k1, which every test above signs with
# (pytest runs a module's tests in file order).
def test_state_changes_through_the_deployed_stack(stack):
    """PROTOCOL.md §4 "State changes" on AWS: the fleet function derives each
    transition from the agents table's stream, and its scheduled sweep (run
    here as EventBridge runs it) marks an agent whose deadline passed, which
    the stream turns into an offline at the deadline; read through the
    query function's URL."""
    auth = {"Authorization": f"Bearer {stack['token']}"}
    agent = "changes-host"
    body = gpu_host(agent, "default", [70000, 70000])
    body["interval_s"] = 5
    body["host"] = {"uptime_s": 5000}
    posted_at = time.time()
    post_signed(stack, body)
    body["sent_at_ms"] += 1000
    body["gpus"] = body["gpus"][:1]
    body["host"] = {"uptime_s": 5001}
    post_signed(stack, body)
    body["sent_at_ms"] += 1000
    body["host"] = {"uptime_s": 3}
    deadline = post_signed(stack, body)["online_until"]

    # The sweep runs every minute on AWS; its rule is part of the stack.
    fleet_function = stack["resources"]["FleetFunction"]
    events = client("events")
    scheduled = [rule for rule in events.list_rules()["Rules"] if rule.get("ScheduleExpression") == "rate(1 minute)"]
    targets = [t["Arn"] for rule in scheduled for t in events.list_targets_by_rule(Rule=rule["Name"])["Targets"]]
    assert any(arn.endswith(f":function:{fleet_function}") for arn in targets), (scheduled, targets)
    deadline_s = calendar.timegm(time.strptime(deadline[:19], "%Y-%m-%dT%H:%M:%S")) + int(deadline[20:23]) / 1000
    time.sleep(max(0.0, deadline_s + 1.0 - time.time()))
    invoked = client("lambda").invoke(
        FunctionName=fleet_function,
        Payload=json.dumps({"version": "0", "id": "stack-test", "detail-type": "Scheduled Event",
                            "source": "aws.events", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "resources": [], "detail": {}}).encode())
    answer = json.loads(invoked["Payload"].read())
    assert "FunctionError" not in invoked, answer
    assert answer.get("marked", -1) >= 0, answer

    def recorded():
        status, page = http("GET", f"{stack['query']}/v1/agents/{agent}/events", auth)
        assert status == 200, page
        return page if "offline" in [e["kind"] for e in page["events"]] else None
    page = wait_for("the offline to be recorded from the stream", recorded, 60)
    events_seen = page["events"]
    assert [e["kind"] for e in events_seen] == ["online", "gpus_changed", "rebooted", "offline"], events_seen
    assert abs(events_seen[0]["at_ms"] / 1000 - posted_at) < 2, events_seen[0]
    assert events_seen[1]["gpus_removed"] == [f"GPU-{agent}-1"]
    offline = events_seen[3]
    assert offline["at"] == deadline and offline["reason"] == "deadline", (offline, deadline)
    status, record = http("GET", f"{stack['query']}/v1/agents/{agent}", auth)
    assert record["status"] == "offline" and record["uptime_30d"] < 1, record

    def listed(query):
        found, cursor = [], None
        while True:
            status, page = http("GET", f"{stack['query']}/v1/agents?status=all&limit=1000&{query}" +
                                (f"&cursor={cursor}" if cursor else ""), auth)
            assert status == 200, page
            found += [a["agent_id"] for a in page["agents"]]
            cursor = page["next_cursor"]
            if not cursor:
                return found
    assert agent in listed("min_uptime=0")
    assert agent not in listed("min_uptime=1")
    # The bad cursor is the client's mistake, answered as such.
    status, refused = http("GET", f"{stack['query']}/v1/agents/{agent}/events?cursor=nope", auth)
    assert status == 400 and "cursor" in refused["error"], refused


def test_webhooks_through_the_deployed_stack(stack):
    """PROTOCOL.md §4 webhooks on AWS: the webhook function, fed by the
    events table's stream, POSTs each transition in order per agent, signed
    the Standard Webhooks way (checked by the reference package), and a
    receiver that refused at first gets every event once it answers, retried
    under the same webhook-id."""
    agent = "hooked-host"
    body = gpu_host(agent, "default", [70000])
    for state in ("up", "draining", "up", "leaving"):
        body["state"] = state
        body["sent_at_ms"] += 1000
        post_signed(stack, body)

    def received():
        if not stack["webhook_log"].exists():
            return []
        return [json.loads(line) for line in stack["webhook_log"].read_text().splitlines()]

    def delivered():
        types = [r["type"] for r in received() if r["status"] == 204 and r["agent_id"] == agent]
        return types if len(types) >= 4 else None
    types = wait_for("the webhooks of four transitions", delivered, 120)
    assert types == ["agent.online", "agent.draining", "agent.undrained", "agent.offline"], types
    everything = received()
    assert all(r["verified"] for r in everything), everything
    refused = [r for r in everything if r["status"] == 503]
    assert len(refused) == 2, everything
    for retried in refused:
        assert any(r["status"] == 204 and r["id"] == retried["id"] for r in everything), everything


def test_a_rotated_fleet_secret_is_picked_up_without_a_redeploy(stack):
    secrets = client("secretsmanager")
    second = os.urandom(32).hex()
    secrets.put_secret_value(SecretId=stack["names"]["fleet"], SecretString=f"k1={stack['secret']},k2={second}")
    key2 = agent_key_for(second, "rotated-agent")
    started = time.monotonic()
    wait_for("a collector keyed with the new key id is accepted",
             lambda: collector(stack, "rotated-agent", "once", "--skip-cpu-usage", agent_key=key2, key_id="k2").returncode == 0,
             SECRET_MAX_AGE_S + 15)
    print(f"new key id accepted after {time.monotonic() - started:.1f} s")

    secrets.put_secret_value(SecretId=stack["names"]["fleet"], SecretString=f"k2={second}")
    started = time.monotonic()
    refused = wait_for("the retired key id is refused",
                       lambda: (r := collector(stack, "old-agent", "once", "--skip-cpu-usage")).returncode != 0 and r,
                       SECRET_MAX_AGE_S + 15)
    assert 'unknown key id \\"k1\\"' in refused.stderr or "unknown key id" in refused.stderr, refused.stderr
    print(f"retired key id refused after {time.monotonic() - started:.1f} s")
    assert collector(stack, "rotated-agent", "once", "--skip-cpu-usage", agent_key=key2, key_id="k2").returncode == 0
