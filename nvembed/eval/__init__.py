"""Evaluation: retrieval (BEIR folders, pytrec_eval), STS, linear-probe classification, clustering, suites."""

from nvembed.eval.classification import evaluate_classification, evaluate_classification_files, linear_probe
from nvembed.eval.clustering import cluster_v_measure, evaluate_clustering, evaluate_clustering_file
from nvembed.eval.encoders import (BM25Retriever, CallableEncoder, SentenceTransformerEncoder, TextEncoder,
                                   TruncatedEncoder, l2_normalize, load_encoder)
from nvembed.eval.mteb_wrapper import MTEBEncoderWrapper
from nvembed.eval.retrieval import dense_search, evaluate_retrieval, evaluate_run, load_beir, subset_beir
from nvembed.eval.sts import evaluate_sts, evaluate_sts_file
from nvembed.eval.suite import count_suite_texts, format_results_table, load_suite, run_suite, write_bar_chart

__all__ = [
    "TextEncoder", "SentenceTransformerEncoder", "CallableEncoder", "BM25Retriever", "TruncatedEncoder", "load_encoder",
    "l2_normalize",
    "load_beir", "subset_beir", "dense_search", "evaluate_run", "evaluate_retrieval",
    "evaluate_sts", "evaluate_sts_file", "linear_probe", "evaluate_classification", "evaluate_classification_files",
    "cluster_v_measure", "evaluate_clustering", "evaluate_clustering_file",
    "load_suite", "run_suite", "count_suite_texts", "format_results_table", "write_bar_chart", "MTEBEncoderWrapper",
]
