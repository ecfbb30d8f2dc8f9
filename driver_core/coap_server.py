"""The CoAP side: OSCORE-protected resources /join, /rx, /ack, /fota, /fota/<version>.

Built on aiocoap's message and OSCORE classes; the UDP listener in front is
`driver_core.coap_transport`. Handlers stay short (decode, one group-committed
write, answer): the device waits, awake, for the answer in the ACK.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiocoap
import cbor2
from aiocoap import error, oscore, resource
from aiocoap.numbers.codes import Code
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper
from aiocoap.transports.oscore import OSCOREAddress
from aiocoap.util.linkformat import LinkFormat
from sqlalchemy.exc import SQLAlchemyError

from . import refusals as why
from .coap_transport import CoapListener, start_listener
from .family import PayloadDecodeError
from .fota.blockwise import OCTET_STREAM, BlockOutOfRange, negotiate
from .oscore_context import oscore_fields
from .security import DeviceContext, DeviceCredentials, DeviceState, PossiblyStaleContext
from .shared_answers import CURRENT_SEAL, AnswerSeal, Retransmission, request_digest
from .storage.health import first_line
from .timefmt import utcnow
from .uplink import Uplink
from .writer import SharedStateRefused, StorageUnavailable, UplinkWriter, WriteJob

if TYPE_CHECKING:
    from .downlinks import DownlinkQueue
    from .family import Family
    from .fota.service import FotaService
    from .refusals import Refusals

_LOGGER = logging.getLogger(__name__)
CBOR = 60  # Content-Format application/cbor


def cbor_answer(code: Code, body: dict[Any, Any]) -> aiocoap.Message:
    """A response carrying the protocol's answer map (empty payload for an empty map)."""
    if not body:
        return aiocoap.Message(code=code)
    return aiocoap.Message(code=code, payload=cbor2.dumps(body), content_format=CBOR)


@contextlib.contextmanager
def unavailable_storage_is_503(refusals: Refusals, **facts: Any) -> Iterator[None]:
    """Storage that fails on the CoAP path (a read, or the writer's commit): 5.03, so the
    device retries later."""
    try:
        yield
    except (SQLAlchemyError, OSError, StorageUnavailable) as exc:
        refusals.record(why.STORAGE, detail=first_line(exc)[:200], **facts)
        raise error.ServiceUnavailable("Storage unavailable, retry later") from None


class DeviceSite(OscoreSiteWrapper):
    """aiocoap's OSCORE wrapper, with the device fetched from the database before lookup
    and every refusal counted."""

    def __init__(
        self,
        inner_site: ResourceTable,
        credentials: DeviceCredentials,
        refusals: Refusals,
        writer: UplinkWriter | None = None,  # cluster mode: answers of retransmissions
    ):
        super().__init__(inner_site, credentials)
        self._inner = inner_site
        self._credentials = credentials
        self._refusals = refusals
        self._writer = writer

    async def render_to_pipe(self, pipe):
        request = pipe.request
        try:
            unprotected = oscore_fields(request)
        except oscore.NotAProtectedMessage:
            self._refusals.record(why.UNPROTECTED, remote=request.remote)
            raise error.Unauthorized("OSCORE required") from None
        except oscore.DecodeError:
            self._refusals.record(why.MALFORMED_OSCORE, remote=request.remote)
            raise error.BadOption("Failed to decode COSE") from None
        kid = unprotected.get(oscore.COSE_KID)
        was_cached = kid is not None and self._credentials.cached(kid) is not None
        with unavailable_storage_is_503(self._refusals, kid=kid):
            state = await self._credentials.preload(kid) if kid is not None else None
        if state is not None and not was_cached:
            self._refusals.cleared(request.remote)  # the rate limiter's prepaid token goes back
        if state is None:
            self._refusals.record(why.UNKNOWN_KID, remote=request.remote, kid=kid)
            raise error.Unauthorized("Security context not found")
        credentials = self._credentials
        try:
            with unavailable_storage_is_503(self._refusals, kid=kid, serial=state.serial):
                if credentials.shared and credentials.names_other_context(state, unprotected):
                    state = await credentials.reload(kid) or state  # a JOIN made elsewhere?
                await self._render_or_reload(pipe, state)
        except error.Unauthorized:
            self._refusals.record(why.NO_CONTEXT, remote=request.remote, kid=kid, serial=state.serial)
            raise
        except error.BadOption:
            self._refusals.record(why.MALFORMED_OSCORE, remote=request.remote, kid=kid, serial=state.serial)
            raise
        except error.BadRequest:
            if not self._refusals.decryption_failed(request.remote, kid, state.serial):
                return  # over the kid's or the source's budget: verified, counted, unanswered
            raise

    async def _render_or_reload(self, pipe, state: DeviceState) -> None:
        """Verify and render; in cluster mode, a failure under the cached context may only mean
        that the device re-joined through another instance: reload it and try once more."""
        try:
            await self._verify_and_render(pipe)
            return
        except (error.BadRequest, PossiblyStaleContext) as exc:
            if not self._credentials.shared or not await self._credentials.reloaded_other_context(state):
                if isinstance(exc, PossiblyStaleContext):
                    await self._replay(pipe, state)
                    return
                raise
        try:
            await self._verify_and_render(pipe)
        except PossiblyStaleContext:
            await self._replay(pipe, state)

    async def _replay(self, pipe, state: DeviceState) -> None:
        """A sequence number the shared window has seen: a retransmission of a committed request
        gets its stored answer (whichever instance sent it); anything else is a replay, 4.01."""
        request = pipe.request
        seqno = int.from_bytes(oscore.verify_start(request).get(oscore.COSE_PIV, b""), "big")
        if self._writer is not None:
            stored = await self._writer.stored_answer(state.device_id, seqno, request_digest(request))
            if stored is not None:
                pipe.add_response(Retransmission(stored).answer, is_last=True)
                return
        self._refusals.record(why.REPLAY, remote=request.remote, kid=state.kid, serial=state.serial)
        # Answered here, as a replay the local window caught is: one refusal, not two.
        pipe.add_response(
            aiocoap.Message(code=Code.UNAUTHORIZED, max_age=0, payload=b"Replay detected"),
            is_last=True,
        )

    async def _verify_and_render(self, pipe) -> None:
        """OSCORE-verify, call the resource, protect its answer: what aiocoap's wrapper does,
        without the inner pipe and the task it drives (about a tenth of a request's CPU)."""
        request = pipe.request
        if request.code not in (Code.FETCH, Code.POST):
            raise error.MethodNotAllowed()
        try:
            context = self._credentials.find_oscore(oscore_fields(request))
        except KeyError:
            raise error.Unauthorized("Security context not found") from None
        try:
            inner, request_id = context.unprotect(request)
        except oscore.ReplayError:
            pipe.add_response(
                aiocoap.Message(code=Code.UNAUTHORIZED, max_age=0, payload=b"Replay detected"),
                is_last=True,
            )
            return
        except oscore.DecodeError:
            raise error.BadOption("Failed to decode COSE") from None
        except oscore.ProtectionInvalid:
            raise error.BadRequest("Decryption failed") from None
        inner.remote = OSCOREAddress(context, request.remote)
        seal = self._seal(request, inner, context, request_id)
        try:
            response = await self._inner.render(inner)
        except Retransmission as exc:  # cluster mode: committed before, answered as then
            pipe.add_response(exc.answer, is_last=True)
            return
        except error.RenderableError as exc:
            response = exc.to_message()
        except Exception:
            _LOGGER.exception("Rendering %s failed", "/" + "/".join(inner.opt.uri_path))
            response = aiocoap.Message(code=Code.INTERNAL_SERVER_ERROR)
        finally:
            if seal is not None:
                CURRENT_SEAL.set(None)
        sealed = seal.answer() if seal is not None else None
        if sealed is not None:
            pipe.add_response(sealed, is_last=True)  # the very bytes stored with the request
            return
        protected, _ = context.context_for_response().protect(response, request_id)
        pipe.add_response(protected, is_last=True)

    def _seal(self, request, inner, context, request_id) -> AnswerSeal | None:
        """Cluster mode: let the resource store its protected answer with the request."""
        if not self._credentials.shared:  # a single instance: its response cache suffices
            return None
        seqno = oscore_seqno(inner)
        if seqno is None:
            return None
        seal = AnswerSeal(
            seqno,
            request_digest(request),
            lambda answer: context.context_for_response().protect(answer, request_id)[0],
        )
        CURRENT_SEAL.set(seal)
        return seal


class ResourceTable:
    """The inner site: a dict from path to resource, refusals counted before the 4.04.

    aiocoap's Site copies the request's options for every lookup; the device
    resources need a dictionary lookup only. `subtrees` route two-segment paths
    by their first segment (`/fota/<version>`).
    """

    def __init__(
        self,
        refusals: Refusals,
        resources: dict[tuple[str, ...], resource.Resource],
        subtrees: dict[str, resource.Resource] | None = None,
    ):
        self._refusals = refusals
        self._resources = resources
        self._subtrees = subtrees or {}

    def get_resources_as_linkheader(self):  # .well-known/core is not offered to devices
        return LinkFormat([])

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        """The answer of the resource at the request's path (4.04, 4.05 raised)."""
        path = tuple(request.opt.uri_path)
        target = self._resources.get(path)
        if target is None and len(path) == 2:
            target = self._subtrees.get(path[0])
        if target is None:
            device = getattr(getattr(request.remote, "security_context", None), "device", None)
            self._refusals.record(
                why.UNKNOWN_RESOURCE,
                kid=getattr(device, "kid", None),
                serial=getattr(device, "serial", None),
                detail="/" + "/".join(request.opt.uri_path),
            )
            raise error.NotFound()
        method = getattr(target, _RENDERERS.get(request.code, ""), None)
        if method is None:
            raise error.MethodNotAllowed()
        return await method(request)


_RENDERERS = {Code.POST: "render_post", Code.GET: "render_get"}


class DeviceResource(resource.Resource):
    """Base of the device resources: authentication, size limit, durable write."""

    message_type = ""

    def __init__(self, core: CoapCore) -> None:
        super().__init__()
        self.core = core

    async def needs_blockwise_assembly(self, request):
        return False

    def context_of(self, request) -> DeviceContext:
        remote = request.remote
        if not isinstance(remote, OSCOREAddress) or not isinstance(remote.security_context, DeviceContext):
            self.core.refusals.record(why.UNPROTECTED, remote=remote)
            raise error.Unauthorized("OSCORE required")
        return remote.security_context

    def check_size(self, request, context: DeviceContext) -> None:
        if request.opt.block1 is not None:
            self.core.refusals.record(
                why.OVERSIZED, kid=context.device.kid, serial=context.device.serial,
                detail="block-wise uplink",
            )
            raise error.RequestEntityTooLarge(
                f"Block-wise uplinks are not supported; send at most {self.core.max_payload} bytes"
            )
        if len(request.payload) > self.core.max_payload:
            self.core.refusals.record(
                why.OVERSIZED, kid=context.device.kid, serial=context.device.serial,
                detail=f"{len(request.payload)} bytes",
            )
            raise error.RequestEntityTooLarge(f"Payload over {self.core.max_payload} bytes")

    async def store(self, job: WriteJob) -> None:
        try:
            with unavailable_storage_is_503(self.core.refusals, serial=job.state.serial):
                await self.core.writer.submit(job)
        except SharedStateRefused as exc:  # cluster mode: another instance got there first
            state = job.state
            if exc.reason == "replay":
                self.core.refusals.record(why.REPLAY, kid=state.kid, serial=state.serial)
                raise error.Unauthorized("Replay detected") from None
            self.core.refusals.record(why.NO_CONTEXT, kid=state.kid, serial=state.serial)
            self.core.credentials.forget(state.kid)  # reload the context in force next time
            raise error.Unauthorized("Security context not found") from None

    def new_uplink(self, state: DeviceState, data: dict[str, Any], now: datetime) -> Uplink:
        """Build the uplink and move `last_seen` (the document carries the previous one)."""
        uplink = Uplink(
            serial=state.serial,
            hw_type=state.hw_type,
            message_type=self.message_type,
            rx_date=now,
            join_date=state.join_date,
            last_seen=state.last_seen,
            data=data,
        )
        state.last_seen = now
        if self.message_type != "join":  # counts data transmissions (the transmission scheme)
            state.uplinks_since_join += 1
        return uplink

    async def accept(
        self,
        context: DeviceContext,
        data: dict[str, Any],
        payload: bytes,
        *,
        answered_ok: bool = True,
        joined: bool = False,
        now: datetime | None = None,
        seqno: int | None = None,
        answer: Callable[[dict[Any, Any]], aiocoap.Message] | None = None,
    ) -> dict[Any, Any]:
        """Store the uplink with the downlink transitions it causes; return answer keys 3/4.

        `answer` makes the response from those keys: in cluster mode it is protected and
        stored with the uplink, for a retransmission that reaches another instance.
        """
        state = context.device
        queue = self.core.downlinks
        async with queue.locks.hold(state.device_id):
            with unavailable_storage_is_503(self.core.refusals, serial=state.serial):
                plan = await queue.plan(state, self.message_type, data, dispatch=answered_ok)
            if plan.acked is not None:
                data["command_id"] = plan.acked.command_id
                data["command"] = plan.acked.command
            previous = (state.last_seen, state.uplinks_since_join)
            uplink = self.new_uplink(state, data, now or utcnow())
            seal = CURRENT_SEAL.get()
            if seal is not None and answer is not None:
                seal.seal(answer(plan.body))
            try:
                await self.store(
                    WriteJob(
                        state, context, uplink, payload, joined=joined,
                        downlink_changes=plan.changes, seqno=seqno,
                        seal=seal if answer is not None else None,
                    )
                )
            except error.RenderableError:  # nothing was stored: the cached device state stays
                state.last_seen, state.uplinks_since_join = previous
                raise
        queue.committed(state, plan)
        return plan.body

    async def render_post(self, request):
        context = self.context_of(request)
        if context.phase != "current":
            # C1/C3 contexts exist only for the JOIN.
            self.core.refusals.record(
                why.JOIN_FIRST, kid=context.device.kid, serial=context.device.serial
            )
            return aiocoap.Message(code=Code.UNAUTHORIZED, payload=b"Join first")
        self.check_size(request, context)
        state = context.device
        data, failure = self.decode(state, request.payload)
        if failure is not None:
            self.core.refusals.record(why.BAD_PAYLOAD, kid=state.kid, serial=state.serial, detail=failure)
        extra = self.answer_extra(state, data) if failure is None else {}

        def answer(body: dict[Any, Any]) -> aiocoap.Message:
            if failure is not None:
                return aiocoap.Message(code=Code.BAD_REQUEST, payload=failure.encode()[:120])
            return cbor_answer(Code.CHANGED, {**body, **extra})

        body = await self.accept(
            context, data, request.payload, answered_ok=failure is None, seqno=oscore_seqno(request),
            answer=answer,
        )
        return answer(body)

    def decode(self, state: DeviceState, payload: bytes) -> tuple[dict[str, Any], str | None]:
        raise NotImplementedError

    def answer_extra(self, state: DeviceState, data: dict[str, Any]) -> dict[Any, Any]:
        """Answer keys a resource adds to its 2.04 (key 5 of POST /fota); may add to `data`."""
        return {}


def oscore_seqno(request: aiocoap.Message) -> int | None:
    """The request's OSCORE sequence number, noted by `DeviceContext.unprotect`."""
    return getattr(request, "oscore_seqno", None)


def undecodable(payload: bytes, reason: str) -> tuple[dict[str, Any], str]:
    """`data` of an uplink that could not be decoded: the raw bytes and why."""
    return {"raw": payload.hex(), "error": reason}, reason


def load_cbor(payload: bytes) -> Any:
    try:
        return cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types for broken input
        raise PayloadDecodeError(f"invalid CBOR: {exc}") from None


class RxResource(DeviceResource):
    message_type = "rx"

    def decode(self, state, payload):
        family = self.core.families.get(state.hw_type)
        if family is None:
            return undecodable(payload, f"no device family for hw_type {state.hw_type}")
        try:
            return family.decode(state.hw_type, payload), None
        except PayloadDecodeError as exc:
            return undecodable(payload, str(exc))


class AckResource(DeviceResource):
    message_type = "ack"

    def decode(self, state, payload):
        try:
            value = load_cbor(payload)
        except PayloadDecodeError as exc:
            return undecodable(payload, str(exc))
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        ):
            return undecodable(payload, "ack must be a CBOR array [downlink_id, result] of two uints")
        downlink_id, result = value
        return {"downlink_id": downlink_id, "result": result, "accepted": result == 0}, None


class FotaResource(DeviceResource):
    """POST /fota: a firmware check `{1: current}` or a failure report `{1: current,
    2: failed version, 3: reason (tstr or uint)}`; a check may be answered with an offer (key 5)."""

    message_type = "fota"

    def decode(self, state, payload):
        try:
            value = load_cbor(payload)
        except PayloadDecodeError as exc:
            return undecodable(payload, str(exc))
        if not isinstance(value, dict) or not isinstance(value.get(1), str):
            return undecodable(payload, "fota request must be a CBOR map {1: firmware version (tstr)}")
        data: dict[str, Any] = {"firmware": value[1]}
        if 2 in value or 3 in value:
            failed, reason = value.get(2), value.get(3)
            if not isinstance(failed, str) or not failed:
                return undecodable(payload, "fota failure report key 2 (failed version) must be a tstr")
            if isinstance(reason, bool) or not isinstance(reason, str | int | None):
                return undecodable(payload, "fota failure report key 3 (reason) must be a tstr or uint")
            data["failed_version"] = failed
            data["reason"] = reason if reason is not None else "no reason given"
        return data, None

    def answer_extra(self, state, data):
        service = self.core.fota
        if service is None:
            return {}
        image = service.check(state, data)
        if image is None:
            return {}
        data["offer"] = {"version": image.version, "size": image.size, "sha256": image.view.sha256}
        return {5: image.offer()}


class FotaDownloadResource(DeviceResource):
    """GET /fota/<version>: one block per request, computed from the request alone (RFC 7959).

    aiocoap's own Block2 cache keys on the remote address and expires; devices
    change addresses and sleep between blocks, so blocks are served here,
    statelessly, straight from the image file. ETag = first 8 bytes of the
    SHA-256, Size2 = image size, on every block.
    """

    render_post = None  # GET only: aiocoap answers anything else 4.05

    async def render_get(self, request):
        context = self.context_of(request)
        state = context.device
        if context.phase != "current":
            self.core.refusals.record(why.JOIN_FIRST, kid=state.kid, serial=state.serial)
            return aiocoap.Message(code=Code.UNAUTHORIZED, payload=b"Join first")
        service = self.core.fota
        version = request.opt.uri_path[1]
        image = service.image(state.hw_type, version) if service is not None else None
        if image is None:
            return aiocoap.Message(code=Code.NOT_FOUND, payload=b"No such firmware")
        if request.opt.etags and image.etag not in request.opt.etags:
            # The device resumes a download whose image was replaced: start again from the offer.
            return aiocoap.Message(code=Code.NOT_FOUND, payload=b"ETag does not match")
        option = request.opt.block2
        wanted = negotiate(option.block_number, option.size_exponent) if option else negotiate(0, 6)
        try:
            block = service.read(image, wanted)
        except BlockOutOfRange as exc:
            return aiocoap.Message(code=Code.BAD_OPTION, payload=str(exc).encode()[:120])
        except OSError as exc:
            _LOGGER.error("Firmware %s (hw_type %s) cannot be read: %s", version, state.hw_type, exc)
            return aiocoap.Message(code=Code.NOT_FOUND, payload=b"Firmware file missing")
        # No write here: the replay window this GET moved is stored with the device's next
        # POST. Until then a restart could accept a replay of a block request, which only
        # returns the very ciphertext already sent (same request nonce, same block): a GET
        # changes nothing. Waiting for a commit per block would cost a transaction per
        # block and delay every block under load.
        service.block_served(state, image, block)
        return aiocoap.Message(
            code=Code.CONTENT,
            payload=block.payload,
            block2=(wanted.number, block.more, wanted.szx),
            size2=image.size,
            etag=image.etag,
            content_format=OCTET_STREAM,
        )


def parse_join(payload: bytes) -> dict[str, Any]:
    """JOIN inner payload `{1: firmware (tstr), 2: hw_type (uint), 3: reset cause (uint, optional)}`."""
    value = load_cbor(payload)
    if not isinstance(value, dict):
        raise PayloadDecodeError("join payload must be a CBOR map")
    firmware, hw_type, reset = value.get(1), value.get(2), value.get(3)
    if not isinstance(firmware, str) or not firmware:
        raise PayloadDecodeError("join key 1 (firmware version) must be a non-empty text string")
    if not isinstance(hw_type, int) or isinstance(hw_type, bool) or hw_type < 0:
        raise PayloadDecodeError("join key 2 (hw_type) must be an unsigned integer")
    data: dict[str, Any] = {"firmware": firmware, "hw_type": hw_type}
    if reset is not None:
        if not isinstance(reset, int) or isinstance(reset, bool) or reset < 0:
            raise PayloadDecodeError("join key 3 (reset cause) must be an unsigned integer")
        data["reset_cause"] = reset
    return data


class JoinResource(DeviceResource):
    """RFC 8613 B.2 steps 2 and 4 (step 2's 4.01 is protected with C2 by the context)."""

    message_type = "join"

    async def render_post(self, request):
        context = self.context_of(request)
        state = context.device
        if context.phase == "join1":
            return aiocoap.Message(code=Code.UNAUTHORIZED)
        self.check_size(request, context)
        try:
            data = parse_join(request.payload)
        except PayloadDecodeError as exc:
            self.core.refusals.record(why.BAD_JOIN, kid=state.kid, serial=state.serial, detail=str(exc))
            raise error.BadRequest(str(exc)[:120]) from None
        if data["hw_type"] != state.hw_type:
            _LOGGER.warning(
                "Device %s joined reporting hw_type %s, enrolled as %s",
                state.serial, data["hw_type"], state.hw_type,
            )
        joined = context.phase == "join3"
        previous = (state.join_date, state.firmware, state.uplinks_since_join, state.last_seen)
        now = utcnow()
        if joined:
            state.join_date = now
            state.uplinks_since_join = 0
        state.firmware = data["firmware"]
        try:
            body = await self.accept(
                context, data, request.payload, joined=joined, now=now, seqno=oscore_seqno(request)
            )
        except (error.ServiceUnavailable, error.Unauthorized):
            state.join_date, state.firmware, state.uplinks_since_join, state.last_seen = previous
            raise
        if joined:
            DeviceCredentials.commit(state, context)
        answer: dict[Any, Any] = {1: state.tx_interval, 2: int(time.time()), 3: 0}
        answer.update(body)
        return cbor_answer(Code.CHANGED, answer)


class CoapCore:
    """What the resources share: the device lookup, the writer, the families, the counters."""

    def __init__(
        self,
        credentials: DeviceCredentials,
        writer: UplinkWriter,
        families: dict[int, Family],
        refusals: Refusals,
        max_payload: int,
        downlinks: DownlinkQueue,
    ) -> None:
        self.credentials = credentials
        self.writer = writer
        self.families = families
        self.refusals = refusals
        self.max_payload = max_payload
        self.downlinks = downlinks
        self.fota: FotaService | None = None  # set by driver_core.fota.start_fota

    def site(self) -> DeviceSite:
        inner = ResourceTable(
            self.refusals,
            {
                ("join",): JoinResource(self),
                ("rx",): RxResource(self),
                ("ack",): AckResource(self),
                ("fota",): FotaResource(self),
            },
            subtrees={"fota": FotaDownloadResource(self)},
        )
        return DeviceSite(inner, self.credentials, self.refusals, self.writer)


async def start_coap_server(core: CoapCore, host: str, port: int) -> CoapListener:
    """Bind the devices' UDP listener to the core's site; host '::' serves IPv4 and IPv6."""
    return await start_listener(core.site(), core.refusals, host, port)
