#include <stdio.h>
#include <stdbool.h>
#include <nftables/libnftables.h>
