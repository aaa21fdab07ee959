/*
 * The pod sandbox's init for scripts/kube-node.sh: holds the pod's namespaces open and
 * reaps orphans, as Kubernetes' own pause does. Built with `gcc -static`, so its image
 * needs nothing but this one file.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig)
{
	(void)sig;
	_exit(0);
}

/* As PID 1 of the pod's PID namespace (shareProcessNamespace), orphans are re-parented
 * here; without reaping they would stay zombies for the pod's whole life. */
static void on_child(int sig)
{
	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

int main(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_term;
	if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0)
		return 1;
	sa.sa_handler = on_child;
	sa.sa_flags = SA_NOCLDSTOP;
	if (sigaction(SIGCHLD, &sa, NULL) < 0)
		return 2;
	for (;;)
		pause();
	return 42;
}
