"""Evaluation of image-text retrieval: ranks, Recall@K, median/mean rank and standard protocols."""
