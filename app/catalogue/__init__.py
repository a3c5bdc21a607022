"""Items added, changed and deleted at serving time, without retraining: the item change log
read by every worker (`service.ItemCatalogue`), its copy in this worker (`changes.ChangeSet`),
and what the changes do to a serving model's overlay (`apply`).

A service of the services layer: imports the foundation, `app.store` (the change log),
`app.search.overlay` and `app.model`; `app.retrieval` reads the overlay it builds."""

from app.catalogue.changes import ChangeSet
from app.catalogue.service import ItemCatalogue
from app.catalogue.state import ItemState, ItemStatus

__all__ = ["ChangeSet", "ItemCatalogue", "ItemState", "ItemStatus"]
