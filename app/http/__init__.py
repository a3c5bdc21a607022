"""The HTTP layer: middleware (body limit, request ids, metrics, access lines), the one
error-to-response mapping (`errors`), schemas, OpenAPI, one router per concern (`routes/`) and
the recall fast path. Imports every layer below it; nothing below imports it."""
