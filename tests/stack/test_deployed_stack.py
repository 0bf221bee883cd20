"""The deployed shape, end to end, on the AWS emulator.

Packages the x86_64 Lambda zips (scripts/package ran before this), uploads
them to the emulator's S3, deploys infra/template.yaml through its
CloudFormation with the SAM transform, and drives the stack through its
function URLs the way users do: the real collector binary sends signed
heartbeats, the capacity API shows the agent online, a forged heartbeat is
refused. It also checks TTL on the table and that each function's role can do
its own job and nothing more.

Only the emulator's loopback endpoint is ever contacted: function URLs the
stack reports (https://<id>.lambda-url.<region>.on.aws/) are reached through
the emulator's path-based form on 127.0.0.1.
"""

import json
import os
import re
import subprocess
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
    names = {"fleet": f"rollcall-{RUN}/fleet-secrets", "tokens": f"rollcall-{RUN}/query-tokens"}
    secrets.create_secret(Name=names["fleet"], SecretString=f"k1={fleet_secret}")
    secrets.create_secret(Name=names["tokens"], SecretString=token)

    s3 = client("s3")
    bucket = f"rollcall-artifacts-{RUN}"
    s3.create_bucket(Bucket=bucket)
    template = (ROOT / "infra" / "template.yaml").read_text()
    for function in ("ingest", "query"):
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
            {"ParameterKey": "Architecture", "ParameterValue": "x86_64"},
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
    yield {
        "ingest": local_url(outputs["IngestUrl"]),
        "query": local_url(outputs["QueryUrl"]),
        "table": outputs["TableName"],
        "secret": fleet_secret,
        "token": token,
        "resources": resources,
        "deploy_s": deploy_s,
    }
    cloudformation.delete_stack(StackName=stack_name)


def collector(stack, agent_id, *args, agent_key=None):
    if agent_key is None:
        agent_key = subprocess.run(
            [binary("rollcall-collector"), "keygen", "--agent-id", agent_id],
            env={**os.environ, "ROLLCALL_FLEET_SECRET": stack["secret"]},
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    env = {
        **os.environ,
        "ROLLCALL_ENDPOINT": stack["ingest"],
        "ROLLCALL_KEY_ID": "k1",
        "ROLLCALL_AGENT_KEY": agent_key,
        "ROLLCALL_AGENT_ID": agent_id,
        "ROLLCALL_CONFIG": "/dev/null",
        "ROLLCALL_STATE_DIR": f"/tmp/rollcall-stack-test-{RUN}",
    }
    env.pop("ROLLCALL_FAKE_GPUS", None)
    return subprocess.run([binary("rollcall-collector"), *args], env=env, capture_output=True, text=True, timeout=60)


def test_template_declares_what_the_emulator_may_ignore():
    template = yaml.load((ROOT / "infra" / "template.yaml").read_text(), Loader=CfnLoader)
    table = template["Resources"]["AgentsTable"]["Properties"]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert table["SSESpecification"] == {"SSEEnabled": True}
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    for name, variable in (("IngestFunction", "ROLLCALL_FLEET_SECRETS"), ("QueryFunction", "ROLLCALL_QUERY_TOKENS")):
        function = template["Resources"][name]["Properties"]
        assert function["FunctionUrlConfig"]["AuthType"] == "NONE"
        assert function["Environment"]["Variables"][variable].startswith("{{resolve:secretsmanager:"), name
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


def test_a_real_collector_reports_through_the_deployed_stack(stack):
    result = collector(stack, "stack-agent", "once", "--skip-cpu-usage")
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
    if not emulator_enforces_iam():
        pytest.skip("the emulator does not enforce IAM (start it with AUTH=true)")
    key = {"agent_id": {"S": "privilege-probe"}}
    item = {**key, "sent": {"N": "1"}}
    query_role = role_client(stack, "QueryFunctionRole")
    query_role.get_item(TableName=stack["table"], Key=key)
    with pytest.raises(botocore.exceptions.ClientError) as denied:
        query_role.put_item(TableName=stack["table"], Item=item)
    assert denied.value.response["Error"]["Code"] in ("AccessDeniedException", "AccessDenied")

    ingest_role = role_client(stack, "IngestFunctionRole")
    ingest_role.put_item(TableName=stack["table"], Item=item)
    for forbidden in (lambda: ingest_role.get_item(TableName=stack["table"], Key=key),
                      lambda: ingest_role.delete_item(TableName=stack["table"], Key=key),
                      lambda: ingest_role.scan(TableName=stack["table"])):
        with pytest.raises(botocore.exceptions.ClientError) as denied:
            forbidden()
        assert denied.value.response["Error"]["Code"] in ("AccessDeniedException", "AccessDenied")
    client("dynamodb").delete_item(TableName=stack["table"], Key=key)


def test_metrics_parse_as_openmetrics(stack):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    collector(stack, "metrics-agent", "once", "--skip-cpu-usage")
    request = urllib.request.Request(loopback_only(f"{stack['query']}/metrics"),
                                     headers={"Authorization": f"Bearer {stack['token']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = response.read().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in ("rollcall_agents", "rollcall_agent_online", "rollcall_agent_cores_available",
                 "rollcall_agent_memory_available_bytes", "rollcall_agent_since_heartbeat_seconds"):
        assert name in families, sorted(families)
    online = {s.labels["agent_id"]: s.value for s in families["rollcall_agent_online"].samples}
    assert online["metrics-agent"] == 1
