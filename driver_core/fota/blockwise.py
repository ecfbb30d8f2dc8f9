"""Stateless Block2 (RFC 7959) serving of firmware images straight from their files.

Every request names its block (number and size exponent); the answer is
computed from that alone, so blocks may come in any order, from any address,
across sleeps and driver restarts. Only the requested range is read
(`os.pread` on one shared descriptor per image): 200 concurrent downloads cost
200 buffers of at most 1024 bytes whatever the image size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MAX_SZX = 6  # 1024-byte blocks: the largest that fits the 1152-byte message limit
OCTET_STREAM = 42  # Content-Format application/octet-stream


class BlockOutOfRange(Exception):
    """The requested block starts at or beyond the end of the image."""


@dataclass(frozen=True, slots=True)
class BlockRequest:
    number: int
    szx: int

    @property
    def size(self) -> int:
        return 1 << (self.szx + 4)

    @property
    def start(self) -> int:
        return self.number * self.size


def negotiate(number: int, szx: int) -> BlockRequest:
    """The block to serve for a requested (NUM, SZX): the device's size, never above SZX 6.

    SZX 7 (BERT, TCP only) is reduced to 6 with the block number scaled, as
    RFC 7959 §2.2 allows a server to answer with a smaller block.
    """
    if szx > MAX_SZX:
        number <<= szx - MAX_SZX
        szx = MAX_SZX
    return BlockRequest(number, szx)


@dataclass(frozen=True, slots=True)
class Block:
    request: BlockRequest
    payload: bytes
    more: bool


def read_block(fd: int, image_size: int, request: BlockRequest) -> Block:
    """Read exactly the requested range; BlockOutOfRange past the end."""
    start = request.start
    if start >= image_size:
        raise BlockOutOfRange(
            f"block {request.number} of {request.size} bytes starts at byte {start}, "
            f"beyond the image's {image_size} bytes"
        )
    length = min(request.size, image_size - start)
    payload = os.pread(fd, length, start)
    if len(payload) != length:  # the file was truncated under us
        raise OSError(f"short read: {len(payload)} of {length} bytes at {start}")
    return Block(request, payload, start + length < image_size)
