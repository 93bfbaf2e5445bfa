"""The pipeline core: schemas, batches, the queue graph, operators, sources and sinks."""
