/* The pod sandbox ("pause") image of the real-node tier: no image can be pulled here, so containerd's
 * sandbox_image is this, built with `gcc -static` into a scratch image. It holds the pod's namespaces
 * and waits; SIGTERM or SIGINT end it with status 0. */
#include <signal.h>
#include <unistd.h>

static void stop(int signal_number) {
  (void)signal_number;
  _exit(0);
}

int main(void) {
  signal(SIGTERM, stop);
  signal(SIGINT, stop);
  for (;;) pause();
}
