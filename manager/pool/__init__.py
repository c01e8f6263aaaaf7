"""The manager's pooled client of the daemons (DaemonService over mTLS).

    async with DaemonPool(tls, "fleet.local", config=PoolConfig()) as pool:
        agents = await pool.list_agents("node-7", "10.0.0.7:7443")
        pool.state("node-7")  # ConnectionState.READY

See `manager.pool.client` for the behaviour, `manager.pool.state` for the
connection state machine and `manager.pool.config` for the settings.
"""

from manager.pool.channel import NodeStats, WrongDaemonIdentity
from manager.pool.client import Clock, DaemonPool
from manager.pool.config import PoolConfig
from manager.pool.state import ConnectionState

__all__ = [
    "Clock",
    "ConnectionState",
    "DaemonPool",
    "NodeStats",
    "PoolConfig",
    "WrongDaemonIdentity",
]
