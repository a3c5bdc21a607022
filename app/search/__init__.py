"""Item search: one `ItemIndex` interface (`search`, `exact_top`), exact (`FlatIndex`, pruned by
clusters when that pays) or approximate (`FaissIndex`: HNSW, IVF), built by `build_item_index`
from one `IndexConfig`; built ANN indexes are kept in an on-disk cache (`ann_cache`). A search
may be restricted to a filter's rows (`AllowedRows`); an ANN index gives a filter searched
often an index of its own rows (`filter_index`).

Imports the service's foundation (`app.config`, `app.errors`, `app.settings`) only."""

from app.search.allowed import AllowedRows
from app.search.build import build_item_index
from app.search.faiss_index import FaissIndex, build_faiss_index
from app.search.flat import FlatIndex
from app.search.item_index import ItemIndex

__all__ = [
    "AllowedRows",
    "FaissIndex",
    "FlatIndex",
    "ItemIndex",
    "build_faiss_index",
    "build_item_index",
]
