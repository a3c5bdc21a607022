"""The online recall service: FastAPI + FAISS + TorchScript user tower + Redis user features."""
