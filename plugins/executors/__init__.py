"""Built-in executors: ``inline`` (this process), ``local`` (a worker process per run, tasks contained), ``dask``."""
from oodbench import hookimpl


@hookimpl
def oodbench_register_executors(register):
    from . import dask_cluster, local

    register(local.InlineExecutor)
    register(local.LocalExecutor)
    register(dask_cluster.DaskExecutor)
