"""`batchgen bench`: batchgen against its peers on the same model, machine and run."""
