"""The Lua scripts in lua/, one file each, registered on a Redis client by name.

redis-py's Script runs a script by its SHA and loads it again by itself when Redis does not know it
(after a restart or SCRIPT FLUSH), so each process reads each file once and sends it rarely. A line
`--!include <name>` in a script is replaced by lua/<name>.lua: steps several scripts share, written once
(Redis 6.2 has no shared script libraries).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import redis
from redis.commands.core import Script

LUA_DIR = Path(__file__).with_name("lua")


INCLUDE = re.compile(r"^--!include (\w+)$", re.MULTILINE)


@cache
def source(name: str) -> str:
    """lua/<name>.lua, with the scripts it includes in place."""
    return INCLUDE.sub(lambda line: source(line.group(1)), (LUA_DIR / f"{name}.lua").read_text())


def register(connection: redis.Redis, name: str) -> Script:
    """The script lua/<name>.lua, bound to `connection`."""
    return connection.register_script(source(name))
