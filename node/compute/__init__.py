"""Where inference runs: the node's own worker threads, or model actors on a Ray cluster."""
