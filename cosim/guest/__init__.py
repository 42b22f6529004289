"""The Linux guest of the tests: Debian's 6.1 kernel and a busybox initramfs under QEMU (TCG).

* :mod:`cosim.guest.image`: :func:`ensure_image` builds (once, cached in ``build/guest/`` or
  ``$OFFCARD_GUEST_DIR``) the kernel and initramfs from Debian packages;
* :mod:`cosim.guest.qemu`: :func:`qemu_args` and :class:`Guest`, QEMU with its console driven
  through a non-blocking, sans-IO interface (plus blocking ``wait_ready`` / ``run``);
* ``init.sh``: the initramfs's ``/init`` and the console protocol it speaks.

``python -m cosim.guest build`` builds the image, ``python -m cosim.guest boot --user-net``
boots it with a shell on the terminal.
"""

from .image import GuestImage, ImageError, ensure_image
from .qemu import (DEFAULT_MAC, Guest, GuestError, Ready, kernel_cmdline, qemu_args, user_net,
                   vhost_user_net)

__all__ = [
    "DEFAULT_MAC",
    "Guest",
    "GuestError",
    "GuestImage",
    "ImageError",
    "Ready",
    "ensure_image",
    "kernel_cmdline",
    "qemu_args",
    "user_net",
    "vhost_user_net",
]
