"""Text from the queue, made safe to show on a terminal: the rule lives in
image_result_client.terminal, which the producer client ships as well."""

from image_result_client.terminal import has_control as has_control
from image_result_client.terminal import printable as printable
from image_result_client.terminal import say as say
