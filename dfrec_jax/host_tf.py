"""TensorFlow for host work only (tf.data, tf.io.gfile, event files, TFDS builders).

Every project module that uses TensorFlow or TFDS imports this module first, so the one thing
a JAX process needs of TensorFlow happens before TensorFlow touches a device: it must not see
the accelerators. A CUDA build of TensorFlow (NGC containers ship one) otherwise reserves most
of each GPU's memory at its first op and JAX runs out of memory; TensorFlow can also claim a
TPU. Device initialisation is lazy in TensorFlow, so hiding at import time is in time even
when TFDS imported TensorFlow earlier. tests/test_host_tf.py checks that every user imports it.
"""

import logging

import tensorflow as tf

log = logging.getLogger(__name__)

HIDDEN_DEVICE_TYPES = ("GPU", "TPU")


def hide_accelerators(tf_module=tf) -> None:
    """Makes TensorFlow see no GPU and no TPU. If TensorFlow already initialised its devices
    (a user's code ran a TF op first), that cannot change any more: a warning says so."""
    for device_type in HIDDEN_DEVICE_TYPES:
        try:
            tf_module.config.set_visible_devices([], device_type)
        except RuntimeError as e:  # "Visible devices cannot be modified after being initialized"
            log.warning("TensorFlow already initialised its devices; it may hold %s memory "
                        "that JAX needs (%s)", device_type, e)  # fmt: skip
        except ValueError:  # no such device type in this TensorFlow build
            pass


hide_accelerators()
