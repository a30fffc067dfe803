"""moto's server, answering like AWS in the few places where llmfleet's playbooks depend on it.

Each fix makes the emulator do what AWS documents, so the roles carry no emulator-only code:

- DescribeDBParameterGroups for a name that does not exist: AWS answers DBParameterGroupNotFound; moto
  answered an empty list, on which amazon.aws.rds_instance_param_group fails ("list index out of range").
- A new PostgreSQL parameter group lists its family's parameters on AWS; moto's lists none, so the module
  reports rds.force_ssl as "not an available parameter". The parameters llmfleet sets are seeded.
- A gp3 RDS instance is always described with its StorageThroughput and Iops on AWS (125 MiB/s and 3000
  below 400 GiB, 500 and 12000 above); moto kept them only when given at creation, which AWS refuses below
  400 GiB, and amazon.aws.rds_instance then fails with KeyError on the second run.
- Spot instances launched by RunInstances (market options given directly or in the launch template, as the
  gpu_hosts role does): AWS makes a spot instance request for each, of the type and interruption behaviour
  asked for, and the instance names it (SpotInstanceRequestId, InstanceLifecycle=spot); moto made none
  and ignored a launch template's market options. The request then follows its instance as AWS documents:
  stopping the instance of a persistent request disables the request (`disabled`,
  instance-stopped-by-user), starting it makes it `active` again; terminating an instance whose
  persistent request is not cancelled opens the request again, which launches a replacement (the same
  launch: image, type, subnet, groups, profile, volumes and tags; at once here, as every wait is), while
  a one-time request is `closed`. A cancelled request stays listed as `cancelled` (moto forgot it), and
  DescribeSpotInstanceRequests filters on instance-id, type, status-code, launched-availability-zone and
  launch.instance-type / launch.image-id / launch.group-id.
- DeleteSubnet of a subnet that still holds an instance that is not terminated answers DependencyViolation,
  as on AWS; moto deleted it.
- DeleteNatGateway removes the gateway's network interface and disassociates its Elastic IP, as AWS does;
  moto left both (the interface in a subnet that teardown then deletes).
- GetSecretValue of a secret scheduled for deletion answers AWS's InvalidRequestException message ("You
  can't perform this operation on the secret because it was marked for deletion."), which the amazon.aws
  secretsmanager_secret lookup recognises (on_deleted); moto's own wording made it a plain failure.
- RDS PostgreSQL instances backed by a real server, when LLMFLEET_EMULATOR_RDS_POSTGRES names one
  (scripts/emulator/rds_postgres.py): CreateDBInstance makes the master role (no superuser, as on RDS) and
  the database there, and the endpoint's address is that server's.
- Launching and starting instances (scripts/emulator/launch.py): InsufficientInstanceCapacity for the
  instance types and zones a test takes away, GetServiceQuota for EC2's per-family vCPU quotas (a control
  at /llmfleet-emulator/capacity and /llmfleet-emulator/quotas), and the groupSet attribute of an instance
  whose groups were given on its network interface.

- Application Load Balancers (scripts/emulator/load_balancers.py): DescribeLoadBalancerAttributes lists
  every attribute with AWS's default from the start; moto listed five, and amazon.aws.elb_application_lb
  failed on the missing idle timeout.

- GPU instances that run real processes (scripts/emulator/fleet.py): an instance registered at
  /llmfleet-emulator/fleet runs its command (an agent and its simulator) while it is running, after a boot
  delay; it is pending for a while after StartInstances and stopping until its command has exited after
  StopInstances (a start then is IncorrectInstanceState, as on AWS); its time in running is kept, as AWS
  bills it.

- AWS Managed Microsoft AD's users and groups (scripts/emulator/directory_data.py): the Directory Service
  Data API (ds-data), Describe/EnableDirectoryDataAccess and ResetUserPassword, kept in memory, or made on
  a real Samba domain controller when LLMFLEET_EMULATOR_DIRECTORY_SAMBA names one (the directory's
  DnsIpAddrs are then its address).

Run as `python server.py -H 127.0.0.1 -p PORT` (the arguments of moto_server); scripts/emulator.py does.
"""

from __future__ import annotations

import copy
import sys
import threading
from typing import Any

import directory_data  # scripts/emulator/directory_data.py
import fleet  # scripts/emulator/fleet.py
import launch as launching  # scripts/emulator/launch.py, beside this file
import load_balancers  # scripts/emulator/load_balancers.py
import rds_postgres  # scripts/emulator/rds_postgres.py
from moto.ec2.exceptions import DependencyViolationError, EC2ClientError
from moto.ec2.models import instances as ec2_instances
from moto.ec2.models import nat_gateways as ec2_nat_gateways
from moto.ec2.models import spot_requests as ec2_spot
from moto.ec2.models import subnets as ec2_subnets
from moto.ec2.models.core import TaggedEC2Resource
from moto.ec2.responses.instances import InstanceResponse
from moto.rds import models as rds
from moto.rds.exceptions import DBParameterGroupNotFoundError
from moto.secretsmanager import models as secretsmanager
from moto.secretsmanager.exceptions import InvalidRequestException
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


# --- spot instances launched by RunInstances ------------------------------------------------------------
# the InstanceMarketOptions of the RunInstances call being served (moto's backend only gets the market type),
# and the request whose instance is being replaced (so that the replacement joins it, not a new request)
_SPOT = threading.local()
# the kwargs of RunInstances that describe the launch, kept per request for its replacements
_LAUNCH_COPIED = ("tags", "nics", "block_device_mappings", "launch_template", "metadata_options")
# the states in which a request still launches instances (AWS: "cancel the request first")
SPOT_LIVE_STATES = ("open", "active", "disabled")


class RunInstancesSpotRequest(ec2_spot.SpotInstanceRequest):
    """The spot instance request AWS makes for a spot instance launched by RunInstances (not by
    RequestSpotInstances: moto's own requests launch their instance in __init__)."""

    # moto files its models by service, from the module's name
    __module__ = "moto.ec2.models.spot_requests"

    def __init__(
        self, backend: Any, instance: Any, spot_options: dict[str, Any], launch: dict[str, Any]
    ) -> None:
        TaggedEC2Resource.__init__(self)
        self.ec2_backend = backend
        self.id = ec2_spot.random_spot_request_id()
        self.launch_specification = ec2_spot.LaunchSpecification(
            kernel_id=None,
            ramdisk_id=None,
            image_id=instance.image_id,
            key_name=instance.key_name,
            instance_type=instance.instance_type,
            placement=instance.placement.zone,
            monitored=instance.monitoring_state == "enabled",
            subnet_id=instance.subnet_id,
        )
        self.launch_specification.groups = list(instance.security_groups)
        price = spot_options.get("MaxPrice")
        self.price = f"{float(price):.6f}" if price else ""
        self.type = spot_options.get("SpotInstanceType") or "one-time"
        self.instance_interruption_behaviour = spot_options.get("InstanceInterruptionBehavior") or "terminate"
        self.valid_from = None
        self.valid_until = None
        self.launch_group = None
        self.availability_zone_group = None
        self.user_data = None
        self.spot_fleet_id = None
        self.launch_spec = None
        self.all_tags: dict[str, dict[str, str]] = {}
        self.launch = launch
        self.instance = instance
        self.fulfil(instance)

    def fulfil(self, instance: Any) -> None:
        self.instance = instance
        instance.lifecycle = "spot"
        instance.spot_instance_request_id = self.id
        self.set_state("active", "fulfilled", "Your spot request is fulfilled.")

    def set_state(self, state: str, code: str, message: str) -> None:
        self.state = state
        self._status_code = code
        self.status_message = message

    @property
    def launched_availability_zone(self) -> str | None:
        return self.instance.placement.zone if self.instance is not None else None

    def replace(self) -> None:
        """A persistent request whose instance was terminated opens again and launches a new one."""
        self.set_state(
            "open", "instance-terminated-by-user", "The request is open again: its instance was terminated."
        )
        image_id, user_data, group_names, kwargs = self.launch
        _SPOT.replacing = self
        try:
            reservation = self.ec2_backend.run_instances(
                image_id, 1, user_data, list(group_names), **_launch_copy(kwargs)
            )
        except Exception:  # AWS keeps the request open and tries again later
            self.set_state("open", "capacity-not-available", "There is no capacity for the request.")
            return
        finally:
            _SPOT.replacing = None
        replacement = reservation.instances[0]
        profile_arn, profile_name = (
            kwargs.get("iam_instance_profile_arn"),
            kwargs.get("iam_instance_profile_name"),
        )
        if profile_arn or profile_name:
            self.ec2_backend.associate_iam_instance_profile(
                instance_id=replacement.id,
                iam_instance_profile_name=profile_name,
                iam_instance_profile_arn=profile_arn,
            )


def _launch_copy(kwargs: dict[str, Any]) -> dict[str, Any]:
    copied = {key: copy.deepcopy(value) if key in _LAUNCH_COPIED else value for key, value in kwargs.items()}
    copied["security_group_ids"] = list(kwargs.get("security_group_ids") or [])
    copied.pop("client_token", None)
    return copied


def _request_of(instance: Any) -> Any:
    request_id = getattr(instance, "spot_instance_request_id", None)
    requests = instance.ec2_backend.spot_instance_requests
    return requests.get(request_id) if request_id else None


def _run_instances_response(original: Any) -> Any:
    def run(self: Any) -> Any:
        _SPOT.market = self._get_param("InstanceMarketOptions", {}) or {}
        try:
            return original(self)
        finally:
            _SPOT.market = {}

    return run


def _run_instances(original: Any) -> Any:
    def run(
        self: Any, image_id: Any, count: int, user_data: Any, security_group_names: Any, **kwargs: Any
    ) -> Any:
        replacing = getattr(_SPOT, "replacing", None)
        market = dict(getattr(_SPOT, "market", None) or {})
        _SPOT.market = {}  # this call only (moto's own spot requests launch through here too)
        if kwargs.get("launch_template") and not replacing:
            template = (
                self._get_template_from_args(kwargs["launch_template"]).data.get("InstanceMarketOptions")
                or {}
            )
            spot_options = {**(template.get("SpotOptions") or {}), **(market.get("SpotOptions") or {})}
            market = {
                "MarketType": market.get("MarketType") or template.get("MarketType"),
                "SpotOptions": spot_options,
            }
        spot = (
            market.get("MarketType") == "spot"
            and not kwargs.get("lifecycle")
            and not kwargs.get("spot_fleet_id")
        )
        launch = (image_id, user_data, list(security_group_names or []), _launch_copy(kwargs))
        reservation = original(self, image_id, count, user_data, security_group_names, **kwargs)
        if replacing is not None:
            replacing.fulfil(reservation.instances[0])
        elif spot:
            for instance in reservation.instances:
                request = RunInstancesSpotRequest(self, instance, market.get("SpotOptions") or {}, launch)
                self.spot_instance_requests[request.id] = request
        return reservation

    return run


def _instance_stop(original: Any) -> Any:
    def stop(self: Any) -> Any:
        previous = original(self)
        request = _request_of(self)
        if request is not None and request.state == "active" and request.type == "persistent":
            request.set_state("disabled", "instance-stopped-by-user", "You stopped the Spot Instance.")
        return previous

    return stop


def _instance_start(original: Any) -> Any:
    def start(self: Any) -> Any:
        previous = original(self)
        request = _request_of(self)
        if request is not None and request.state == "disabled":
            request.set_state("active", "fulfilled", "Your spot request is fulfilled.")
        return previous

    return start


def _instance_terminate(original: Any) -> Any:
    def terminate(self: Any) -> Any:
        was = self.state
        previous = original(self)
        request = _request_of(self)
        if request is None or was == "terminated" or request.instance is not self:
            return previous
        if request.state == "cancelled":
            request.set_state(
                "cancelled",
                "instance-terminated-by-user",
                "The request is cancelled; its instance terminated.",
            )
        elif request.type == "persistent" and isinstance(request, RunInstancesSpotRequest):
            request.replace()
        elif request.state in SPOT_LIVE_STATES:
            request.set_state("closed", "instance-terminated-by-user", "You terminated the Spot Instance.")
        return previous

    return terminate


def _cancel_spot_instance_requests(self: Any, request_ids: list[str]) -> list[Any]:
    """AWS keeps a cancelled request (state cancelled); its running instance keeps running."""
    requests = []
    for request_id in request_ids:
        request = self.spot_instance_requests.get(request_id)
        if request is None:
            raise EC2ClientError(
                "InvalidSpotInstanceRequestID.NotFound",
                f"The spot instance request ID '{request_id}' does not exist",
            )
        if request.state in SPOT_LIVE_STATES:
            running = request.instance is not None and request.instance.state != "terminated"
            request.state = "cancelled"
            request._status_code = (
                "request-canceled-and-instance-running" if running else "canceled-before-fulfillment"
            )
            request.status_message = "Spot Instance request was canceled by user."
        requests.append(request)
    return requests


def _spot_filter_value(original: Any) -> Any:
    def value(self: Any, filter_name: str, method_name: str | None = None) -> Any:
        instance = getattr(self, "instance", None)
        spec = self.launch_specification
        extra = {
            "instance-id": instance.id if instance is not None else None,
            "type": self.type,
            "status-code": self._status_code,
            "launched-availability-zone": instance.placement.zone if instance is not None else None,
            "launch.instance-type": spec.instance_type,
            "launch.image-id": spec.image_id,
            "launch.group-id": [group.id for group in spec.groups if group is not None],
        }
        if filter_name in extra:
            return extra[filter_name]
        return original(self, filter_name, method_name)

    return value


def _delete_subnet(original: Any) -> Any:
    def delete(self: Any, subnet_id: str) -> Any:
        for instance in self.all_instances():
            if instance.subnet_id == subnet_id and instance.state != "terminated":
                raise DependencyViolationError(
                    f"The subnet '{subnet_id}' has dependencies and cannot be deleted."
                )
        return original(self, subnet_id)

    return delete


def _delete_nat_gateway(original: Any) -> Any:
    def delete(self: Any, nat_gateway_id: str) -> Any:
        nat = original(self, nat_gateway_id)
        eni = getattr(nat, "_eni", None)
        if eni is not None and eni.id in self.enis:
            for address in list(self.addresses):
                if address.eni is eni:
                    self.disassociate_address(address=address.public_ip)
            self.delete_network_interface(eni.id)
        return nat

    return delete


def _get_secret_value(original: Any) -> Any:
    def get(self: Any, secret_id: str, version_id: str, version_stage: str) -> Any:
        if self._is_valid_identifier(secret_id) and self.secrets[secret_id].is_deleted():
            raise InvalidRequestException(
                "You can't perform this operation on the secret because it was marked for deletion."
            )
        return original(self, secret_id, version_id, version_stage)

    return get


def apply() -> None:
    rds.RDSBackend.describe_db_parameter_groups = _describe_db_parameter_groups(  # type: ignore[method-assign]
        rds.RDSBackend.describe_db_parameter_groups
    )
    rds.DBParameterGroup.__init__ = _parameter_group_init(rds.DBParameterGroup.__init__)  # type: ignore[method-assign]
    rds.DBInstance.__init__ = _instance_init(rds.DBInstance.__init__)  # type: ignore[method-assign]
    launching.apply()
    rds_postgres.apply()
    directory_data.apply()
    load_balancers.apply()
    apply_spot()
    nat = ec2_nat_gateways.NatGatewayBackend
    nat.delete_nat_gateway = _delete_nat_gateway(nat.delete_nat_gateway)  # type: ignore[method-assign]
    secrets = secretsmanager.SecretsManagerBackend
    secrets.get_secret_value = _get_secret_value(secrets.get_secret_value)  # type: ignore[method-assign]


def apply_spot() -> None:
    InstanceResponse.run_instances = _run_instances_response(InstanceResponse.run_instances)  # type: ignore[method-assign]
    backend = ec2_instances.InstanceBackend
    backend.run_instances = _run_instances(backend.run_instances)  # type: ignore[method-assign]
    instance = ec2_instances.Instance
    instance.stop = _instance_stop(instance.stop)  # type: ignore[method-assign]
    instance.start = _instance_start(instance.start)  # type: ignore[method-assign]
    instance.terminate = _instance_terminate(instance.terminate)  # type: ignore[method-assign]
    ec2_spot.SpotRequestBackend.cancel_spot_instance_requests = _cancel_spot_instance_requests  # type: ignore[method-assign]
    request = ec2_spot.SpotInstanceRequest
    request.get_filter_value = _spot_filter_value(request.get_filter_value)  # type: ignore[method-assign]
    ec2_subnets.SubnetBackend.delete_subnet = _delete_subnet(ec2_subnets.SubnetBackend.delete_subnet)  # type: ignore[method-assign]
    fleet.apply()  # after the spot requests' wrappers: a registered instance's state is the last word


if __name__ == "__main__":
    apply()
    sys.exit(main())
