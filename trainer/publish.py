"""The end of a run: the best weights, evaluated on test/ when there is one, published once."""

from shared import store
from shared.stores import Store
from trainer import TrainerError
from trainer.loop import evaluate


def best_model_meta(
    run, net, data, config, best_acc, device, bf16, normalize, mean, std, channels_last=True
) -> dict:
    """Load the best epoch's weights into net, test them, and describe them for model.json.

    best_acc None: no validation (--valid-ratio 0), the last epoch's weights are the best.
    """
    net.load_state_dict(run.load_best())
    metrics = {"epochs": config["epochs"]}
    if best_acc is None:
        metrics["validation"] = "none: trained on every image, last epoch published"
    else:
        metrics["valid_acc"] = round(best_acc, 4)
    tta = config.get("tta", "off")
    if data.test is not None:
        _, test_acc, confusion = evaluate(
            net, data.test, device, bf16, normalize, channels_last=channels_last, tta=tta
        )
        per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
        metrics["test_acc"] = round(test_acc, 4)
        metrics["test_per_class_acc"] = dict(
            zip(data.class_names, [round(a, 4) for a in per_class], strict=True)
        )
        run.plot_confusion(confusion, data.class_names)
        print(f"test acc {test_acc:.4f} on {len(data.test)} images")
    meta = {
        "run_id": run.run_id,
        "arch": config["arch"],
        "class_names": data.class_names,
        "image_size": config["image_size"],
        "mean": list(mean),
        "std": list(std),
        "metrics": metrics,
        "config": config,
    }
    if tta == "hflip":
        meta["tta"] = "hflip"  # the published accuracy averages each image with its mirror
    return meta


def published_version(models: Store, run_id: str) -> str | None:
    """The version run_id already published, if any (found by model.json's run_id)."""
    for version in reversed(models.list_versions()):
        try:
            if models.read_meta(version).get("run_id") == run_id:
                return version
        except store.StoreError:  # someone else's broken version is not ours
            continue
    return None


def publish_once(models: Store, run, net, meta: dict) -> str:
    """Publish net unless this run already did (a torchrun restart after the publish, or a
    kill between publishing and result.json), mark the run finished, return the version."""
    try:
        version = published_version(models, run.run_id)
    except store.StoreError as exc:
        raise TrainerError(f"{exc}; the run's best weights stay in {run.path}/best.pt") from None
    if version is None:
        try:
            version = models.publish(net.state_dict(), meta)
        except store.StoreError as exc:
            raise TrainerError(
                f"{exc}; the run's best weights stay in {run.path}/best.pt"
            ) from None
    run.write_result({"version": version, "metrics": meta["metrics"]})
    return version
