"""Export (placeholder until the exporter lands)."""


def export_model(embedder, folder, run_cfg):
    embedder.save_weights(folder)
