"""moto's server, answering like AWS in the few places where llmfleet's playbooks depend on it.

Each fix makes the emulator do what AWS documents, so the roles carry no emulator-only code:

- DescribeDBParameterGroups for a name that does not exist: AWS answers DBParameterGroupNotFound; moto
  answered an empty list, on which amazon.aws.rds_instance_param_group fails ("list index out of range").
- A new PostgreSQL parameter group lists its family's parameters on AWS; moto's lists none, so the module
  reports rds.force_ssl as "not an available parameter". The parameters llmfleet sets are seeded.
- A gp3 RDS instance is always described with its StorageThroughput and Iops on AWS (125 MiB/s and 3000
  below 400 GiB, 500 and 12000 above); moto kept them only when given at creation, which AWS refuses below
  400 GiB, and amazon.aws.rds_instance then fails with KeyError on the second run.

Run as `python server.py -H 127.0.0.1 -p PORT` (the arguments of moto_server); scripts/emulator.py does.
"""

from __future__ import annotations

import sys
from typing import Any

from moto.rds import models as rds
from moto.rds.exceptions import DBParameterGroupNotFoundError
from moto.server import main

# the parameters of the postgres families that llmfleet sets, as AWS lists them in a new group
POSTGRES_PARAMETERS: dict[str, dict[str, Any]] = {
    "rds.force_ssl": {
        "ParameterName": "rds.force_ssl",
        "ParameterValue": "0",
        "Description": "Force SSL connections.",
        "Source": "engine-default",
        "ApplyType": "dynamic",
        "DataType": "boolean",
        "AllowedValues": "0,1",
        "IsModifiable": True,
        "ApplyMethod": "pending-reboot",
    },
}


def _describe_db_parameter_groups(original: Any) -> Any:
    def describe(self: Any, kwargs: dict[str, Any]) -> Any:
        groups = original(self, kwargs)
        name = kwargs.get("db_parameter_group_name")
        if name and not groups:
            raise DBParameterGroupNotFoundError(name)
        return groups

    return describe


def _parameter_group_init(original: Any) -> Any:
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if (self.family or "").startswith("postgres"):
            for name, parameter in POSTGRES_PARAMETERS.items():
                self.parameters[name] = dict(parameter)

    return init


def _instance_init(original: Any) -> Any:
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.storage_type == "gp3":
            large = int(self.allocated_storage or 0) >= 400
            if self.storage_throughput is None:
                self.storage_throughput = 500 if large else 125
            if self.iops is None:
                self.iops = 12000 if large else 3000

    return init


def apply() -> None:
    rds.RDSBackend.describe_db_parameter_groups = _describe_db_parameter_groups(  # type: ignore[method-assign]
        rds.RDSBackend.describe_db_parameter_groups
    )
    rds.DBParameterGroup.__init__ = _parameter_group_init(rds.DBParameterGroup.__init__)  # type: ignore[method-assign]
    rds.DBInstance.__init__ = _instance_init(rds.DBInstance.__init__)  # type: ignore[method-assign]


if __name__ == "__main__":
    apply()
    sys.exit(main())
