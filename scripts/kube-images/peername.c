/* peername HOST PORT: connect over TCP/IPv4 and print the address getpeername() returns,
 * as HOST:PORT. The tests' check that an application sees the ClusterIP it dialled, not
 * the backend connect-time load balancing chose (busybox has no applet that prints it). */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct sockaddr_in dialled = { .sin_family = AF_INET }, peer;
	socklen_t length = sizeof(peer);
	char text[INET_ADDRSTRLEN];
	int fd;

	if (argc != 3 || inet_pton(AF_INET, argv[1], &dialled.sin_addr) != 1) {
		fprintf(stderr, "usage: peername IPV4 PORT\n");
		return 2;
	}
	dialled.sin_port = htons((unsigned short)atoi(argv[2]));
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&dialled, sizeof(dialled)) != 0) {
		perror("connect");
		return 1;
	}
	if (getpeername(fd, (struct sockaddr *)&peer, &length) != 0) {
		perror("getpeername");
		return 1;
	}
	printf("%s:%u\n", inet_ntop(AF_INET, &peer.sin_addr, text, sizeof(text)),
	       ntohs(peer.sin_port));
	close(fd);
	return 0;
}
