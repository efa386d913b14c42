"""infra/ checked offline (the Kubernetes manifests and the GPU work-pool template), against the real parsers and schemas: no network,
no Docker engine, no cluster (tests/fixtures/infra.py loads the files)."""
from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
from typing import Any, Iterator

import pytest

from tests.fixtures.infra import DOC, GPU, INFRA, K8S_VERSIONS, NAMESPACE, PLACEHOLDER, ROOT, SECRET_NAME, _require, containers, doc_code_lines, infra_files, k8s, k8s_docs, pod_specs, prefect_parse, split_commands, template, torchrun_args


# ------------------------------------------------------------------------------------------------
# Kubernetes manifests
# ------------------------------------------------------------------------------------------------
KNOWN_KINDS = {("v1", "Namespace"), ("v1", "ConfigMap"), ("v1", "ServiceAccount"), ("v1", "Service"),
               ("v1", "PersistentVolumeClaim"), ("apps/v1", "Deployment"), ("batch/v1", "Job"),
               ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding")}


def test_k8s_kinds_names_and_namespaces():
    seen = set()
    docs = k8s_docs()
    assert len(docs) >= 10
    for path, doc in docs:
        assert (doc.get("apiVersion"), doc.get("kind")) in KNOWN_KINDS, f"{path.name}: {doc.get('apiVersion')}/{doc.get('kind')}"
        meta = doc["metadata"]
        key = (doc["kind"], meta["name"])
        assert key not in seen, f"{path.name}: {key} defined twice"
        seen.add(key)
        if doc["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE
        else:
            assert meta.get("namespace") == NAMESPACE, f"{path.name}: {key} must be in namespace {NAMESPACE}"
        assert doc["kind"] != "Secret", "no Secret manifests (no secret values in the repository): kubectl create secret"


def test_k8s_manifests_validate_against_kubernetes_schemas():
    kv = _require("kubernetes_validate", "kubernetes-validate")
    for version in K8S_VERSIONS:
        for path, doc in k8s_docs():
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): "
                            f"{'/'.join(map(str, exc.path))}: {exc.message}")


def test_k8s_schema_check_can_fail():
    """The schema check rejects a broken manifest (so a green run means something)."""
    kv = _require("kubernetes_validate", "kubernetes-validate")
    job = copy.deepcopy(k8s("Job", "snapgen-pretrain"))
    job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["gpus"] = {"nvidia": 8}
    with pytest.raises(kv.ValidationError):
        kv.validate(job, K8S_VERSIONS[-1], strict=True)
    job = copy.deepcopy(k8s("Job", "snapgen-pretrain"))
    job["spec"]["template"]["spec"]["containers"][0]["comand"] = ["torchrun"]
    with pytest.raises(kv.ValidationError):
        kv.validate(job, K8S_VERSIONS[-1], strict=True)


def secret_refs(node: Any) -> Iterator[tuple[str, str, str]]:
    """(kind, name, key) of every secretKeyRef / configMapKeyRef below `node`."""
    if isinstance(node, dict):
        for kind in ("secretKeyRef", "configMapKeyRef"):
            if kind in node and isinstance(node[kind], dict):
                yield kind, node[kind]["name"], node[kind]["key"]
        for v in node.values():
            yield from secret_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from secret_refs(v)


def documented_secrets() -> dict[str, set[str]]:
    """{secret name: keys} from the `kubectl create secret generic` commands of docs/infra.md."""
    secrets: dict[str, set[str]] = {}
    for line in doc_code_lines():
        for argv in split_commands(line):
            if argv[:1] == ["kubectl"] and "secret" in argv and "generic" in argv:
                assert argv[argv.index("-n") + 1] == NAMESPACE
                name = argv[argv.index("generic") + 1]
                keys = secrets.setdefault(name, set())
                for tok in argv:
                    m = re.match(r"--from-(literal|file)=([\w.-]+)=(.*)", tok)
                    if m:
                        keys.add(m.group(2))
    return secrets


def test_secret_and_configmap_references_are_defined():
    secrets = documented_secrets()
    assert secrets, "docs/infra.md must show how to create the secrets"
    for line in doc_code_lines():
        if "create secret" in line:
            for m in re.finditer(r"--from-literal=[\w.-]+=(\S+)", line):
                assert m.group(1).startswith(('"$', "$")), f"docs: secret values come from the shell, not literals: {line}"
    config = k8s("ConfigMap", "snapgen-config")["data"]
    refs = [r for _, d in k8s_docs() for r in secret_refs(d)] + list(secret_refs(template()))
    assert any(kind == "secretKeyRef" for kind, _, _ in refs)
    for kind, name, key in refs:
        if kind == "secretKeyRef":
            assert key in secrets.get(name, set()), f"secretKeyRef {name}/{key} is not created in docs/infra.md"
        else:
            assert name == "snapgen-config" and key in config, f"configMapKeyRef {name}/{key} is not in config.yaml"
    used_secrets = {(n, k) for kind, n, k in refs if kind == "secretKeyRef"}
    worker_env = {e["name"]: e.get("value") for e in k8s("Deployment", "snapgen-worker")["spec"]["template"]["spec"]["containers"][0]["env"]}
    used_secrets.add((worker_env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME"],
                      worker_env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY"]))
    documented = {(n, k) for n, keys in secrets.items() for k in keys}
    assert documented == used_secrets, f"documented but unused: {documented - used_secrets}; used but undocumented: {used_secrets - documented}"


def k8s_env_entries() -> Iterator[tuple[str, dict]]:
    for label, pod in pod_specs():
        for c in containers(pod):
            for e in c.get("env") or [] if isinstance(c.get("env"), list) else []:
                yield f"{label}:{c['name']}", e


def test_no_literal_secrets_in_k8s():
    for where, entry in k8s_env_entries():
        if SECRET_NAME.search(entry["name"]) and not entry["name"].endswith(("_SECRET_NAME", "_SECRET_KEY")):
            assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), \
                f"{where}: {entry['name']} must come from a secretKeyRef"
    for key, value in k8s("ConfigMap", "snapgen-config")["data"].items():
        assert not SECRET_NAME.search(key), f"config.yaml: {key} looks secret; use a Secret"
        assert not re.search(r"://[^/\s:@]+:[^@\s]+@", value), f"config.yaml: {key} embeds credentials"


def test_all_infra_files_are_free_of_credentials():
    patterns = [(re.compile(r"AKIA[0-9A-Z]{16}"), "an AWS access key id"),
                (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
                (re.compile(r"\bminioadmin\b"), "MinIO's default credentials"),
                (re.compile(r"://[\w.-]+:(?!\$|\*\*\*|\{\{)[^@\s/]+@"), "a URI with a literal password")]
    for path in [*infra_files(""), DOC]:
        if path.name == ".env.example":
            continue
        text = path.read_text()
        for pattern, what in patterns:
            m = pattern.search(text)
            assert not m, f"{path.relative_to(ROOT)}: {what}: {m.group(0)!r}"


def test_pods_run_as_non_root_without_privileges():
    for label, pod in pod_specs():
        ctx = pod.get("securityContext") or {}
        assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) != 0, f"{label}: runAsNonRoot"
        for c in containers(pod):
            sc = c.get("securityContext") or {}
            assert sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged"), f"{label}:{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label}:{c['name']}: drop all capabilities"
        mounts = {m["name"] for c in containers(pod) for m in c.get("volumeMounts", [])}
        home = template()["variables"]["properties"]["home_volume"]["default"]
        volumes = {(home if v == "{{ home_volume }}" else v)["name"] for v in pod.get("volumes", [])}
        assert mounts <= volumes, f"{label}: mounts without volumes: {mounts - volumes}"


def test_worker_rbac_and_deployment():
    sa = k8s("ServiceAccount", "snapgen-worker")
    deploy = k8s("Deployment", "snapgen-worker")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    binding = k8s("RoleBinding", "snapgen-worker")
    assert {"kind": "ServiceAccount", "name": "snapgen-worker", "namespace": NAMESPACE} in binding["subjects"]
    role = k8s(binding["roleRef"]["kind"], binding["roleRef"]["name"])
    grants = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"create", "get", "list", "watch", "delete"} <= grants[("batch", "jobs")]
    assert {"get", "list", "watch"} <= grants[("", "pods")] and "get" in grants[("", "pods/log")]
    assert not any("*" in verbs or r == "secrets" for (g, r), verbs in grants.items()), "least privilege"
    assert deploy["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    c = pod["containers"][0]
    argv = [*c["command"], *c["args"]]
    bound = prefect_parse(argv[argv.index("prefect") + 1:])
    assert bound["worker_type"] == "kubernetes" and bound["work_pool_name"] == "snapgen-gpu"
    env = {e["name"]: e for e in c["env"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]["value"] == NAMESPACE
    assert c["livenessProbe"]["httpGet"]["port"] in [p["name"] for p in c["ports"]]
    assert str(c["ports"][0]["containerPort"]) == env["PREFECT_WORKER_WEBSERVER_PORT"]["value"]
    # the flow-run service account exists and has no token
    runner = template()["variables"]["properties"]["service_account_name"]["default"]
    assert k8s("ServiceAccount", runner).get("automountServiceAccountToken") is False


def test_multinode_job_is_consistent():
    job = k8s("Job", "snapgen-pretrain")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    assert pod["restartPolicy"] == "Never"
    args, c = torchrun_args(job)
    assert args.nnodes == str(spec["completions"]), "--nnodes must equal the Job's completions"
    assert int(args.nproc_per_node) == int(c["resources"]["limits"][GPU]), "--nproc-per-node must equal the GPU limit"
    assert "$(JOB_COMPLETION_INDEX)" in " ".join(c["args"]) and args.node_rank == 0
    assert args.rdzv_backend == "c10d" and args.max_restarts == 0
    # rendezvous on pod 0 through the headless Service named by the pod's subdomain
    svc = k8s("Service", pod["subdomain"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"].get("publishNotReadyAddresses") is True
    host, port = args.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]] and int(port) in [p["containerPort"] for p in c["ports"]]
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    # the launcher module exists; the spec is on the shared volume
    assert args.module and importlib.util.find_spec(args.training_script) is not None
    assert args.training_script == "snapgen_model.training.launch"
    spec_path = args.training_script_args[0]
    shared = _mount_of(pod, c, spec_path)
    assert shared["persistentVolumeClaim"]["claimName"] == k8s("PersistentVolumeClaim", "snapgen-shared")["metadata"]["name"]
    assert "ReadWriteMany" in k8s("PersistentVolumeClaim", "snapgen-shared")["spec"]["accessModes"]
    assert pod["nodeSelector"] and pod["tolerations"] and pod.get("terminationGracePeriodSeconds", 30) >= 120


def _mount_of(pod: dict, container: dict, path: str) -> dict:
    mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no mounted volume"
    return next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])


def load_prepare_script():
    spec = importlib.util.spec_from_file_location("pretrain_spec", INFRA / "scripts" / "pretrain_spec.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_job_matches_the_multinode_job():
    script = load_prepare_script()
    prep = k8s("Job", "snapgen-pretrain-prepare")
    pod = prep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"][0] == "python"
    script_in_image = c["command"][1]
    assert script_in_image == "/opt/snapgen/app/infra/scripts/pretrain_spec.py", "WORKDIR of the images + repo path"
    opts = script.build_parser().parse_args(c["args"])
    job = k8s("Job", "snapgen-pretrain")
    args, train = torchrun_args(job)
    assert opts.nodes == job["spec"]["completions"] == int(args.nnodes)
    assert opts.gpus_per_node == int(args.nproc_per_node) == int(train["resources"]["limits"][GPU])
    assert str(opts.out) == args.training_script_args[0]
    assert _mount_of(pod, c, str(opts.out)) == _mount_of(job["spec"]["template"]["spec"], train, str(opts.out))
    home = {e["name"]: e.get("value") for e in c["env"]}["SNAPGEN_HOME"]
    assert home == {e["name"]: e.get("value") for e in train["env"]}["SNAPGEN_HOME"]
    _mount_of(pod, c, home + "/x")
    batch = [s for s in opts.set_ if s.startswith("batch_size=")]
    assert batch and int(batch[0].split("=")[1]) % (opts.nodes * opts.gpus_per_node) == 0


def test_prepare_script_writes_the_spec_the_launcher_reads(tmp_path):
    from snapgen_model.config_base import ConfigError
    from snapgen_model.distill.cache import CacheConfig
    from snapgen_model.training.pretrain import PretrainConfig

    script = load_prepare_script()
    manifest = {"key": "k" * 16, "config": CacheConfig(targets_per_sample=1).to_dict(), "encoders": [{"name": "clip"}]}
    spec = script.build_spec(tmp_path / "cache", manifest, preset="toy-smoke", preset_overrides=[],
                             pretrain_overrides=["steps=4", "batch_size=8"], nodes=2, gpus_per_node=2, home=tmp_path)
    assert set(spec) >= {"preset", "overrides", "pretrain", "cache", "cache_dir", "encoders", "state_root", "result_path"}
    cfg = PretrainConfig.from_dict(spec["pretrain"])
    assert (cfg.devices, cfg.num_nodes, cfg.strategy, cfg.accelerator, cfg.steps) == (2, 2, "ddp", "gpu", 4)
    assert CacheConfig.from_dict(spec["cache"]).targets_per_sample == 1 and spec["encoders"] == ["clip"]
    assert spec["state_root"].startswith(str(tmp_path / "runs" / "pretrain-")) and spec["state_root"].endswith("/state")
    with pytest.raises(ConfigError, match="batch_size"):
        script.build_spec(tmp_path, manifest, preset="toy-smoke", preset_overrides=[], pretrain_overrides=["batch_size=6"],
                          nodes=2, gpus_per_node=2, home=tmp_path)
    with pytest.raises(ConfigError, match="devices"):
        script.build_spec(tmp_path, manifest, preset="toy-smoke", preset_overrides=[], pretrain_overrides=["devices=4"],
                          nodes=2, gpus_per_node=2, home=tmp_path)
    out = tmp_path / "shared" / "spec.json"
    script.write_json_atomic(out, spec)
    assert json.loads(out.read_text()) == spec and not list(out.parent.glob(".*tmp*"))


# ------------------------------------------------------------------------------------------------
# the GPU work-pool template
# ------------------------------------------------------------------------------------------------
# prefect-kubernetes compares each flow-run manifest with this base and rejects missing or different values
PREFECT_K8S_BASE_MANIFEST = {
    "apiVersion": "batch/v1", "kind": "Job", "metadata": {"annotations": {}, "labels": {}},
    "spec": {"template": {"spec": {"parallelism": 1, "completions": 1, "restartPolicy": "Never",
                                   "containers": [{"name": "prefect-job"}]}}},
}


def render_template(values: dict[str, Any]) -> dict:
    """The job configuration the worker builds: defaults + job variables, through Prefect's templating."""
    from prefect.utilities.templating import apply_values

    tpl = template()
    variables = {k: copy.deepcopy(v["default"]) for k, v in tpl["variables"]["properties"].items() if "default" in v}
    variables.update(values)
    return apply_values(copy.deepcopy(tpl["job_configuration"]), variables)


def _drop_none(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_none(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_drop_none(v) for v in node if v is not None]
    return node


def test_template_passes_prefects_work_pool_validation():
    from prefect.server.schemas.actions import WorkPoolCreate

    pool = WorkPoolCreate(name="snapgen-gpu", type="kubernetes", base_job_template=template())
    assert pool.base_job_template["job_configuration"]["job_manifest"]["kind"] == "Job"
    broken = copy.deepcopy(template())
    del broken["variables"]["properties"]["gpu_count"]
    with pytest.raises(ValueError, match="gpu_count"):
        WorkPoolCreate(name="snapgen-gpu", type="kubernetes", base_job_template=broken)


def test_template_variables_are_a_valid_schema_with_valid_defaults():
    import jsonschema

    variables = template()["variables"]
    cls = jsonschema.validators.validator_for(variables, default=jsonschema.Draft202012Validator)
    cls.check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    cls(variables).validate(defaults)
    gpu = variables["properties"]["gpu_count"]
    assert gpu["type"] == "integer" and gpu["default"] >= 1 and gpu.get("minimum") == 0
    with pytest.raises(jsonschema.ValidationError):
        cls(variables).validate(defaults | {"gpu_count": "eight"})
    used = set(PLACEHOLDER.findall(json.dumps(template()["job_configuration"])))
    custom = {"gpu_count", "node_selector", "tolerations", "shm_size", "home_volume"}
    assert custom <= used, f"declared but unused variables: {custom - used}"


def test_template_requests_gpus_through_the_gpu_count_variable():
    manifest = template()["job_configuration"]["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"][GPU] == "{{ gpu_count }}"
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"
    for key in ("command", "env", "labels", "name", "namespace", "job_manifest"):
        assert key in template()["job_configuration"], f"job_configuration.{key} (Prefect's kubernetes format)"


def test_rendered_template_is_a_valid_prefect_and_kubernetes_job():
    from jsonpatch import JsonPatch

    config = render_template({"gpu_count": 4, "name": "nightly-abc", "command": "prefect flow-run execute",
                              "labels": {"prefect.io/flow-run-id": "1"}, "annotations": {}, "env": {"A": "1"}})
    manifest = _drop_none(config["job_manifest"])
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"][GPU] == 4
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert manifest["metadata"]["namespace"] == NAMESPACE and manifest["metadata"]["generateName"] == "nightly-abc-"
    assert {v["name"] for v in pod["volumes"]} >= {m["name"] for m in container["volumeMounts"]}
    # prefect-kubernetes' own manifest check
    patch = JsonPatch.from_diff(manifest, PREFECT_K8S_BASE_MANIFEST)
    problems = [op for op in patch if op["op"] in ("add", "replace")]
    assert not problems, f"prefect-kubernetes would reject the manifest: {problems}"
    # the Kubernetes API schema (the API server drops the two pod-level fields Prefect insists on, with a warning)
    kv = _require("kubernetes_validate", "kubernetes-validate")
    api = copy.deepcopy(manifest)
    api["metadata"].pop("namespace")
    for key in ("parallelism", "completions"):
        api["spec"]["template"]["spec"].pop(key)
    container = api["spec"]["template"]["spec"]["containers"][0]
    container["args"] = container["args"].split() if isinstance(container.get("args"), str) else container.get("args")
    container["env"] = [{"name": "A", "value": "1"}, *container["env"]]  # the worker turns the env dict into a list
    for version in K8S_VERSIONS:
        kv.validate(api, version, strict=True)
    # a zero-GPU override still renders (CPU flow runs on the same pool)
    assert render_template({"gpu_count": 0})["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][GPU] == 0
