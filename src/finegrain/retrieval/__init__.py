"""Retrieval: k-NN search over descriptors with faiss (exact and approximate indexes)."""

from .search import build_index, knn, search

__all__ = ["knn", "build_index", "search"]
