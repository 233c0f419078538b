"""The contract between trainer and inference: classes, model, preprocessing, model store."""
