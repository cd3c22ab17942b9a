"""Exports of a finished manifest: WebDataset shards per bucket, their dataset card, and the Hub push."""

from __future__ import annotations

from prep.export.webdataset import ExportSummary, export_webdataset, format_summary, hf_features

__all__ = ["ExportSummary", "export_webdataset", "format_summary", "hf_features", "push_export"]


def __getattr__(name: str):
    # Lazy: huggingface_hub is imported only by `prep push`.
    if name == "push_export":
        from prep.export.hub import push_export

        return push_export
    raise AttributeError(name)
