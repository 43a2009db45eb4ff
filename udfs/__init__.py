"""Image pixels, embeddings, PQ codes and image_knn (issue: image similarity in SQL)."""
