"""The radiologist's verdict on the node's results: intake, matching, storage, agreement and drift."""
